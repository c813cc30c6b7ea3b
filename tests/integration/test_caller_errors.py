"""A caller's mistake raises in the caller and never reaches, let alone
kills, the client's I/O thread (issue #9 item 4): every public method of
SyncClient, AsyncClient and ProcessClient is called with wrong types, then a
normal round trip on the SAME client must work."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from typing import Any, Callable, Iterator

import pytest

from django_message_broker import AsyncClient, SyncClient
from django_message_broker import protocol as p
from django_message_broker.exceptions import InvalidName
from django_message_broker.worker import ProcessClient

NOT_BYTES = ["a str body", 5, None, 1.5, ["list"], {"dict": 1}, object()]
#: (ttl, exception)
BAD_TTLS = [
    ("60", TypeError),
    (None, TypeError),
    (True, TypeError),
    (-1, ValueError),
    (0, ValueError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (10**9, ValueError),
]
#: (capacity, exception)
BAD_CAPACITIES = [
    ("5", TypeError),
    (None, TypeError),
    (True, TypeError),
    (5.0, TypeError),
    (0, ValueError),
    (-1, ValueError),
    (2**64, ValueError),
]
BAD_NAMES = [123, None, b"bytes", "a b", "x" * 164]  # 164: protocol.MAX_NAME_LENGTH
#: (capacities, exception)
BAD_RULES = [
    ("a.*", TypeError),
    (5, TypeError),
    ([("a.*",)], TypeError),
    ([(1, 5)], TypeError),
    ([("a.*", "5")], TypeError),
    ([("a.*", 0)], ValueError),
    ([{"a.*"}], TypeError),
]
BAD_TIMEOUTS = [("1", TypeError), (True, TypeError), (-1, ValueError), (math.nan, ValueError), (math.inf, ValueError)]


@pytest.fixture
def made() -> Iterator[list[Any]]:
    clients: list[Any] = []
    yield clients
    for client in clients:
        client.close()


def assert_alive(client: Any) -> None:
    core = client.core
    assert core._thread.is_alive() and not core.closed


def test_sync_client_survives_every_wrong_call(broker, made):
    client = SyncClient(broker.address, timeout=2)
    made.append(client)
    assert client.wait_connected(5)
    calls: list[tuple[Callable[[], Any], type[BaseException]]] = []
    for body in NOT_BYTES:
        calls.append((lambda body=body: client.send("c", body), TypeError))
        calls.append((lambda body=body: client.group_send("g", body), TypeError))
    for ttl, exc in BAD_TTLS:
        calls.append((lambda ttl=ttl: client.send("c", b"x", ttl=ttl), exc))
        calls.append((lambda ttl=ttl: client.group_send("g", b"x", ttl=ttl), exc))
        calls.append((lambda ttl=ttl: client.group_add("g", "c", ttl=ttl), exc))
    for capacity, exc in BAD_CAPACITIES:
        calls.append((lambda capacity=capacity: client.send("c", b"x", capacity=capacity), exc))
        calls.append((lambda capacity=capacity: client.group_send("g", b"x", capacity=capacity), exc))
    for rules, exc in BAD_RULES:
        calls.append((lambda rules=rules: client.group_send("g", b"x", capacities=rules), exc))
    for name in BAD_NAMES:
        calls.append((lambda name=name: client.send(name, b"x"), InvalidName))
        calls.append((lambda name=name: client.receive(name, timeout=0.1), InvalidName))
        calls.append((lambda name=name: client.group_add(name, "c"), InvalidName))
        calls.append((lambda name=name: client.group_add("g", name), InvalidName))
        calls.append((lambda name=name: client.group_discard(name, "c"), InvalidName))
        calls.append((lambda name=name: client.group_discard("g", name), InvalidName))
        calls.append((lambda name=name: client.group_send(name, b"x"), InvalidName))
    for timeout, exc in BAD_TIMEOUTS:
        calls.append((lambda timeout=timeout: client.receive("c", timeout=timeout), exc))
        calls.append((lambda timeout=timeout: client.wait_connected(timeout), exc))
    for call, exc in calls:
        with pytest.raises(exc) as info:
            call()
        assert type(info.value) is exc or exc is InvalidName
        assert_alive(client)
    # a value the client's checks cannot see (a bad request built by hand)
    # fails that request, not the I/O thread
    with pytest.raises(TypeError):
        client._request(p.Send(0, "c", object(), 1))  # type: ignore[arg-type]
    assert_alive(client)
    round_trip_sync(client)


def round_trip_sync(client: SyncClient) -> None:
    client.send("c", b"one")
    client.send("c", bytearray(b"two"))  # bytes-like bodies are copied to bytes
    assert client.receive("c", timeout=5) == b"one"
    assert client.receive("c", timeout=5) == b"two"
    client.group_add("g", "c")
    assert client.group_send("g", b"three") == (1, 0)
    assert client.receive("c", timeout=5) == b"three"
    client.group_discard("g", "c")
    assert client.stats()
    client.flush()


async def test_async_client_survives_every_wrong_call(broker, made):
    client = AsyncClient(broker.address, timeout=2)
    made.append(client)
    calls: list[tuple[Callable[[], Any], type[BaseException]]] = []
    for body in NOT_BYTES:
        calls.append((lambda body=body: client.send("c", body), TypeError))
        calls.append((lambda body=body: client.group_send("g", body), TypeError))
    for ttl, exc in BAD_TTLS:
        calls.append((lambda ttl=ttl: client.send("c", b"x", ttl=ttl), exc))
        calls.append((lambda ttl=ttl: client.group_send("g", b"x", ttl=ttl), exc))
        calls.append((lambda ttl=ttl: client.group_add("g", "c", ttl=ttl), exc))
    for capacity, exc in BAD_CAPACITIES:
        calls.append((lambda capacity=capacity: client.send("c", b"x", capacity=capacity), exc))
        calls.append((lambda capacity=capacity: client.group_send("g", b"x", capacity=capacity), exc))
    for rules, exc in BAD_RULES:
        calls.append((lambda rules=rules: client.group_send("g", b"x", capacities=rules), exc))
    for name in BAD_NAMES:
        calls.append((lambda name=name: client.send(name, b"x"), InvalidName))
        calls.append((lambda name=name: client.receive(name), InvalidName))
        calls.append((lambda name=name: client.group_add(name, "c"), InvalidName))
        calls.append((lambda name=name: client.group_add("g", name), InvalidName))
        calls.append((lambda name=name: client.group_discard(name, "c"), InvalidName))
        calls.append((lambda name=name: client.group_discard("g", name), InvalidName))
        calls.append((lambda name=name: client.group_send(name, b"x"), InvalidName))
    for call, exc in calls:
        with pytest.raises(exc) as info:
            await call()
        assert type(info.value) is exc or exc is InvalidName
        assert_alive(client)
    await client.send("c", b"one")
    assert await client.receive("c") == b"one"
    await client.group_add("g", "c")
    assert await client.group_send("g", b"two") == (1, 0)
    assert await client.receive("c") == b"two"
    await client.group_discard("g", "c")
    await client.flush()


BAD_MESSAGES = [
    "a str",
    None,
    ["a", "list"],
    {"type": "t", "v": {1, 2}},
    {"type": "t", "v": frozenset()},
    {"type": "t", "v": decimal.Decimal("1.5")},
    {"type": "t", "v": uuid.uuid4()},
    {"type": "t", "v": datetime.date(2026, 1, 1)},
    {"type": "t", "v": datetime.datetime(2026, 1, 1)},
    {"type": "t", "v": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)},
    {"type": "t", "v": object()},
    {"type": "t", "v": 2**64},
    {"type": "t", 1: "int key"},
]


def test_process_client_survives_every_wrong_call(broker, made):
    client = ProcessClient(address=broker.address, embedded=False, timeout=2)
    made.append(client)
    for message in BAD_MESSAGES:
        with pytest.raises(TypeError):
            client.send("c", message)
        with pytest.raises(TypeError):
            client.group_send("g", message)
    for name in BAD_NAMES:
        for call in (
            lambda name=name: client.send(name, {"type": "t"}),
            lambda name=name: client.receive(name, timeout=0.1),
            lambda name=name: client.group_add(name, "c"),
            lambda name=name: client.group_add("g", name),
            lambda name=name: client.group_discard(name, "c"),
            lambda name=name: client.group_discard("g", name),
            lambda name=name: client.group_send(name, {"type": "t"}),
        ):
            with pytest.raises(TypeError):
                call()
    for timeout, exc in BAD_TIMEOUTS:
        with pytest.raises(exc):
            client.receive("c", timeout=timeout)
    assert_alive(client._sync)
    client.send("c", {"type": "t", "tuple": (1, 2)})
    assert client.receive("c", timeout=5) == {"type": "t", "tuple": [1, 2]}
    client.group_add("g", "c")
    assert client.group_send("g", {"type": "g"}) == (1, 0)
    assert client.receive("c", timeout=5) == {"type": "g"}
    client.group_discard("g", "c")


async def test_process_client_async_twins_survive_every_wrong_call(broker, made):
    client = ProcessClient(address=broker.address, embedded=False, timeout=2)
    made.append(client)
    for message in BAD_MESSAGES:
        with pytest.raises(TypeError):
            await client.asend("c", message)
        with pytest.raises(TypeError):
            await client.agroup_send("g", message)
    for name in BAD_NAMES:
        for call in (
            lambda name=name: client.asend(name, {"type": "t"}),
            lambda name=name: client.areceive(name),
            lambda name=name: client.agroup_add(name, "c"),
            lambda name=name: client.agroup_add("g", name),
            lambda name=name: client.agroup_discard(name, "c"),
            lambda name=name: client.agroup_discard("g", name),
            lambda name=name: client.agroup_send(name, {"type": "t"}),
        ):
            with pytest.raises(TypeError):
                await call()
    assert_alive(client._sync)
    await client.asend("c", {"type": "t"})
    assert await client.areceive("c") == {"type": "t"}
    await client.agroup_add("g", "c")
    assert await client.agroup_send("g", {"type": "g"}) == (1, 0)
    assert await client.areceive("c") == {"type": "g"}
    await client.agroup_discard("g", "c")
    await client.aflush()


def test_a_str_body_raises_in_the_caller_and_the_message_after_it_arrives(broker, made):
    # The bug report: a str body killed the I/O thread; later sends raised
    # ClientClosed or returned while the message was lost.
    client = SyncClient(broker.address)
    made.append(client)
    with pytest.raises(TypeError, match="body must be bytes, not str"):
        client.send("c", "hello")  # type: ignore[arg-type]
    client.send("c", b"hello")
    assert client.receive("c", timeout=5) == b"hello"
