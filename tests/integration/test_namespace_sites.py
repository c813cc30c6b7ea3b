"""Two "sites" on one real broker, each a layer with its own ``prefix``:
the same channel and group names do not cross, and one site's ``flush()``
leaves the other's messages, groups and buffered deliveries alone."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from django_message_broker.layer import ChannelsServerLayer
from django_message_broker.worker import ProcessClient

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sites(broker) -> AsyncIterator[tuple[ChannelsServerLayer, ChannelsServerLayer]]:
    a = ChannelsServerLayer(address=broker.address, embedded=False, prefix="siteA")
    b = ChannelsServerLayer(address=broker.address, embedded=False, prefix="siteB")
    yield a, b
    await a.close()
    await b.close()


async def nothing_on(layer: ChannelsServerLayer, channel: str, wait: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(layer.receive(channel), wait)
    except asyncio.TimeoutError:
        return True
    return False


async def test_same_names_do_not_cross(sites):
    a, b = sites
    await a.send("jobs", {"type": "a"})
    await b.send("jobs", {"type": "b"})
    assert await asyncio.wait_for(a.receive("jobs"), 5) == {"type": "a"}
    assert await asyncio.wait_for(b.receive("jobs"), 5) == {"type": "b"}
    assert await nothing_on(a, "jobs") and await nothing_on(b, "jobs")


async def test_same_group_names_do_not_cross(sites):
    a, b = sites
    a_member, b_member = await a.new_channel(), await b.new_channel()
    assert a_member.startswith("specific.") and "siteA" not in a_member  # users see their own names
    await a.group_add("room", a_member)
    await b.group_add("room", b_member)
    await a.group_send("room", {"type": "from.a"})
    assert await asyncio.wait_for(a.receive(a_member), 5) == {"type": "from.a"}
    assert await nothing_on(b, b_member)


async def test_flush_empties_only_its_own_namespace(sites, broker):
    a, b = sites
    await a.send("queued", {"type": "a"})
    await b.send("queued", {"type": "b"})
    b_member = await b.new_channel()
    await b.group_add("room", b_member)
    await a.group_add("room", await a.new_channel())
    await a.flush()
    assert await nothing_on(a, "queued")
    assert await asyncio.wait_for(b.receive("queued"), 5) == {"type": "b"}
    await b.group_send("room", {"type": "still"})
    assert await asyncio.wait_for(b.receive(b_member), 5) == {"type": "still"}
    stats = await b.client.stats()
    assert stats["groups"] == 1  # siteA.room went, siteB.room stayed


async def test_flush_keeps_the_other_sites_buffered_deliveries(sites):
    """B's client holds prefetched messages when A flushes: they survive
    (client side, Flushed names the namespace) and are read in order."""
    a, b = sites
    for n in range(5):
        await b.send("stream", {"n": n})
    assert await asyncio.wait_for(b.receive("stream"), 5) == {"n": 0}  # prefetches the rest
    await a.send("stream", {"n": "a"})
    await a.flush()
    got = [(await asyncio.wait_for(b.receive("stream"), 5))["n"] for _ in range(4)]
    assert got == [1, 2, 3, 4]


async def test_capacity_rules_match_the_unprefixed_member_name(broker):
    layer = ChannelsServerLayer(
        address=broker.address, embedded=False, prefix="siteC", channel_capacity={"limited*": 1}
    )
    try:
        await layer.group_add("room", "limited.one")
        await layer.group_add("room", "open.one")
        await layer.group_send("room", {"n": 1})
        await layer.group_send("room", {"n": 2})
        assert await asyncio.wait_for(layer.receive("limited.one"), 5) == {"n": 1}
        assert await nothing_on(layer, "limited.one")
        assert [(await asyncio.wait_for(layer.receive("open.one"), 5))["n"] for _ in range(2)] == [1, 2]
    finally:
        await layer.close()


async def test_empty_prefix_shares_and_flushes_everything(broker, sites):
    a, _ = sites
    bus = ChannelsServerLayer(address=broker.address, embedded=False, prefix="")
    try:
        await bus.send("siteA.jobs", {"type": "over the bus"})  # a deliberate cross-project bus
        assert await asyncio.wait_for(a.receive("jobs"), 5) == {"type": "over the bus"}
        await a.send("jobs", {"type": "queued"})
        await bus.flush()
        assert await nothing_on(a, "jobs")
    finally:
        await bus.close()


def test_process_client_meets_the_layer_of_its_namespace(broker):
    async def main() -> None:
        layer = ChannelsServerLayer(address=broker.address, embedded=False, prefix="siteA")
        try:
            channel = await layer.new_channel()
            await layer.group_add("workers", channel)
            with ProcessClient(address=broker.address, embedded=False, prefix="siteA") as worker:
                assert worker.group_send("workers", {"type": "job"}) == (1, 0)
                with ProcessClient(address=broker.address, embedded=False, prefix="siteB") as other:
                    assert other.group_send("workers", {"type": "job"}) == (0, 0)
            assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "job"}
        finally:
            await layer.close()

    asyncio.run(main())
