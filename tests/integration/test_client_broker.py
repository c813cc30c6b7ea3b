"""Clients against a real broker (the ``broker`` fixture), over real zmq."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from typing import Any, Callable, Iterator

import msgspec
import psutil
import pytest
import zmq
import zmq.asyncio
from asgiref.sync import async_to_sync

from django_message_broker import AsyncClient, SyncClient
from django_message_broker import protocol as p
from django_message_broker.exceptions import BrokerUnavailable, MessageTooLarge, QueueFull, from_wire
from helpers import free_port

MiB = 1 << 20


@pytest.fixture
def clients() -> Iterator[Callable[..., Any]]:
    """``clients(cls, address, **options)``: a client closed at teardown."""
    made: list[Any] = []

    def make(cls: type, address: str, **options: Any) -> Any:
        client = cls(address, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def numbered(n: int, prefix: bytes = b"") -> list[bytes]:
    return [prefix + b"%d" % i for i in range(n)]


def ready_endpoints(broker: Any, channel: str) -> int:
    """How many endpoints hold credit for ``channel`` on the broker."""

    def look() -> int:
        queue = broker.server.broker.queues.get(channel)
        return 0 if queue is None else sum(1 for e in queue.subscribers.values() if e.ready)

    return broker.call(look)  # type: ignore[no-any-return]


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- basics -------------------------------------------------------------------------
async def test_async_send_and_receive(broker, clients):
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    await tx.send("basic", b"hello")
    assert await asyncio.wait_for(rx.receive("basic"), 5) == b"hello"


def test_sync_send_and_receive_and_a_timed_out_receive_loses_nothing(broker, clients):
    tx, rx = clients(SyncClient, broker.address), clients(SyncClient, broker.address)
    tx.send("sync", b"one")
    assert rx.receive("sync", timeout=5) == b"one"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        rx.receive("sync", timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 2
    tx.send("sync", b"two")
    assert rx.receive("sync", timeout=5) == b"two"


async def test_group_send_reaches_members(broker, clients):
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    await rx.group_add("room", "member.one")
    await rx.group_add("room", "member.two")
    assert await tx.group_send("room", b"hi") == (2, 0)
    assert await asyncio.wait_for(rx.receive("member.one"), 5) == b"hi"
    assert await asyncio.wait_for(rx.receive("member.two"), 5) == b"hi"
    await rx.group_discard("room", "member.two")
    assert await tx.group_send("room", b"again") == (1, 0)
    assert await asyncio.wait_for(rx.receive("member.one"), 5) == b"again"


async def test_a_pipelined_group_send_returns_at_once_and_reports_skipped_members(broker, clients):
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    await rx.group_add("room.nc", "nc.free")
    await rx.group_add("room.nc", "nc.full")
    await tx.send("nc.full", b"fills it", capacity=1)
    reported = []
    answered = threading.Event()

    def skipped(sent: int, skipped: int) -> None:  # on the client's I/O thread
        reported.append((sent, skipped))
        answered.set()

    result = await tx.group_send_pipelined("room.nc", b"hi", capacity=1, on_skipped=skipped)
    assert result is None
    assert await asyncio.wait_for(rx.receive("nc.free"), 5) == b"hi"
    assert await asyncio.to_thread(answered.wait, 5)
    assert reported == [(1, 1)]
    assert await asyncio.wait_for(rx.receive("nc.full"), 5) == b"fills it"
    # group_send waits, and answers with the counts (capacity 2: whether
    # the broker has heard of the receive above yet or not, both get it)
    assert await tx.group_send("room.nc", b"again", capacity=2) == (2, 0)


def test_a_pipelined_group_send_sync(broker, clients):
    tx, rx = clients(SyncClient, broker.address), clients(SyncClient, broker.address)
    rx.group_add("room.ncs", "ncs.one")
    assert tx.group_send_pipelined("room.ncs", b"hi") is None
    assert rx.receive("ncs.one", timeout=5) == b"hi"


async def test_a_pipelined_group_send_without_a_broker_fails_to_its_caller(clients):
    """Pipelining needs a connection: without one, the group_send waits for
    the broker's answer like any request, and fails to its caller."""
    client = clients(AsyncClient, f"tcp://127.0.0.1:{free_port()}", timeout=0.3)
    with pytest.raises(BrokerUnavailable):
        await client.group_send_pipelined("room", b"lost?")


async def test_new_channel_fetches_ahead_and_unread_messages_go_back(broker):
    """The layer's ``new_channel`` grants the broker credit at once: a send
    to it reaches this process before its first receive. Never received,
    the message goes back to the broker after ``idle_return``."""
    from django_message_broker.layer import ChannelsServerLayer

    # idle_return 1 s: what the test does before its receive takes far less,
    # even on a loaded machine, and the unread channel goes back after it.
    layer = ChannelsServerLayer(address=broker.address, embedded=False, prefix="t", idle_return=1.0)
    try:
        await layer.flush()  # connected
        read, unread = await layer.new_channel(), await layer.new_channel()
        await until(lambda: ready_endpoints(broker, "t." + read) == 1 and ready_endpoints(broker, "t." + unread) == 1)
        await layer.send(read, {"type": "early"})
        await layer.send(unread, {"type": "early"})
        state = layer.client.core.state
        await until(lambda: bool(state.channels["t." + read].buffer))  # here before any receive
        assert await asyncio.wait_for(layer.receive(read), 5) == {"type": "early"}
        await until(lambda: "t." + unread not in state.channels, timeout=10)  # withdrawn, returned, forgotten

        def back_at_the_broker() -> bool:
            queue = broker.server.broker.queues.get("t." + unread)
            return queue is not None and len(queue.queue) == 1 and queue.held == 0

        await until(lambda: broker.call(back_at_the_broker))
    finally:
        await layer.close()


# -- ordering and exactly-once --------------------------------------------------------
async def test_fifo_of_5000_messages_between_two_async_clients(broker, clients):
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    expected = numbered(5000)

    async def produce() -> None:
        for body in expected:
            await tx.send("fifo", body, capacity=10_000)

    async def consume() -> list[bytes]:
        return [await rx.receive("fifo") for _ in expected]

    _, got = await asyncio.wait_for(asyncio.gather(produce(), consume()), 30)
    assert got == expected


def test_fifo_of_5000_messages_between_two_sync_clients_in_threads(broker, clients):
    tx, rx = clients(SyncClient, broker.address), clients(SyncClient, broker.address)
    expected = numbered(5000)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for body in expected:
                tx.send("fifo.sync", body, capacity=10_000)
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    got = [rx.receive("fifo.sync", timeout=10) for _ in expected]
    producer.join(10)
    assert not errors
    assert got == expected


async def test_two_receivers_on_a_normal_channel_get_each_message_once(broker, clients):
    tx = clients(AsyncClient, broker.address)
    receivers = [clients(AsyncClient, broker.address) for _ in range(2)]
    n = 2000
    got: list[list[int]] = [[], []]
    done = asyncio.Event()

    async def consume(i: int) -> None:
        while True:
            got[i].append(int(await receivers[i].receive("shared")))
            if len(got[0]) + len(got[1]) >= n:
                done.set()

    tasks = [asyncio.create_task(consume(i)) for i in range(2)]
    for body in numbered(n):
        await tx.send("shared", body, capacity=10_000)
    await asyncio.wait_for(done.wait(), 20)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(got[0] + got[1]) == list(range(n))  # each exactly once
    assert got[0] and got[1]  # both took part
    for mine in got:  # each sees its share in FIFO order
        assert mine == sorted(mine)


async def test_a_receiver_that_stops_strands_nothing(broker, clients):
    """One consumer takes a message and stops receiving; the other still gets
    everything sent afterwards (the idle one hands back what it prefetched)."""
    tx = clients(AsyncClient, broker.address)
    idle = clients(AsyncClient, broker.address, idle_return=0.2)
    busy = clients(AsyncClient, broker.address)
    await tx.send("stranded", b"first")
    assert await asyncio.wait_for(idle.receive("stranded"), 5) == b"first"
    receiving = asyncio.create_task(busy.receive("stranded"))
    await until(lambda: ready_endpoints(broker, "stranded") == 2)  # both hold credit
    expected = numbered(50)
    for body in expected:
        await tx.send("stranded", body, capacity=1000)
    got = [await asyncio.wait_for(receiving, 10)]
    for _ in range(len(expected) - 1):
        got.append(await asyncio.wait_for(busy.receive("stranded"), 10))
    assert sorted(got, key=int) == expected


async def test_cancelled_receive_loses_nothing(broker, clients):
    """Cancel receives at many points while messages arrive: every message
    still reaches a receive exactly once. (Order under cancellation is
    pinned down deterministically by the next test.)"""
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    n = 300
    got: list[bytes] = []
    cancelled = completed = 0
    for i in range(n):
        task = asyncio.create_task(rx.receive("cancel"))
        if i % 2:
            await tx.send("cancel", b"%d" % i, capacity=10_000)
        for _ in range(i % 11):
            await asyncio.sleep(0)
        if i % 5 == 0:
            await asyncio.sleep(0.0005 * (i % 4))  # give the I/O thread a moment
        if i % 2 == 0:
            await tx.send("cancel", b"%d" % i, capacity=10_000)
        task.cancel()
        try:
            got.append(await task)
            completed += 1
        except asyncio.CancelledError:
            cancelled += 1
    while len(got) < n:
        got.append(await asyncio.wait_for(rx.receive("cancel"), 5))
    assert cancelled > 0  # the test did cancel pending receives
    assert sorted(got, key=int) == numbered(n)  # nothing lost, nothing twice
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(rx.receive("cancel"), 0.3)


def _block_loop_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Hold the event loop (no yielding) until the client's I/O thread has
    done something: this opens a race window on purpose."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the I/O thread did not get there"
        time.sleep(0.001)


async def test_the_next_receive_gets_the_message_of_a_cancelled_one(broker, clients):
    """A delivery reaches a receive that is cancelled before it resumes; a
    later message is already buffered. The next receive must get the first
    message (the cancelled receive's), not the later one."""
    # A SyncClient sends from this thread without ever yielding to the loop.
    tx, rx = clients(SyncClient, broker.address), clients(AsyncClient, broker.address)
    assert await asyncio.to_thread(tx.wait_connected, 5)
    assert await asyncio.to_thread(rx.wait_connected, 5)
    first = asyncio.create_task(rx.receive("next.gets.it"))
    await asyncio.sleep(0)  # the receive is waiting
    state = rx.core.state.channels["next.gets.it"]
    assert len(state.waiters) == 1
    tx.send("next.gets.it", b"m1")
    tx.send("next.gets.it", b"m2")
    # m1 resolves the waiting receive (its result is on its way to this
    # loop), m2 waits in the client's buffer.
    _block_loop_until(lambda: len(state.buffer) == 1 and not state.waiters)
    assert not first.done()  # the race window is open
    first.cancel()
    received = [await rx.receive("next.gets.it")]  # something is buffered: no wait
    with pytest.raises(asyncio.CancelledError):
        await first
    received.append(await asyncio.wait_for(rx.receive("next.gets.it"), 5))
    assert sorted(received) == [b"m1", b"m2"]  # nothing lost
    assert received == [b"m1", b"m2"], "a cancelled receive's message was overtaken by a later one"


async def test_receive_pending_on_one_loop_while_another_threads_loop_sends(broker, clients):
    client = clients(AsyncClient, broker.address)  # one client, shared by two loops
    result: dict[str, Any] = {}
    pending = threading.Event()

    def other_thread() -> None:
        async def main() -> bytes:
            task = asyncio.create_task(client.receive("cross.loop"))
            await asyncio.sleep(0)
            pending.set()
            return await asyncio.wait_for(task, 10)

        try:
            result["value"] = asyncio.run(main())
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert await asyncio.to_thread(pending.wait, 5)
    await until(lambda: ready_endpoints(broker, "cross.loop") == 1)  # waiting on the other loop
    assert "value" not in result
    await client.send("cross.loop", b"from-main-loop")
    await asyncio.to_thread(thread.join, 10)
    assert result == {"value": b"from-main-loop"}


async def test_more_receives_than_prefetch_all_get_a_message(broker, clients):
    rx = clients(AsyncClient, broker.address, prefetch=4)
    tx = clients(AsyncClient, broker.address)
    receives = [asyncio.ensure_future(rx.receive("many")) for _ in range(6)]
    await until(lambda: ready_endpoints(broker, "many") == 1)
    for i in range(6):
        await tx.send("many", b"%d" % i)
    got = await asyncio.wait_for(asyncio.gather(*receives), 5)
    assert sorted(got) == [b"%d" % i for i in range(6)]


# -- limits ---------------------------------------------------------------------------
async def test_capacity_3_three_sends_pass_the_fourth_raises(broker, clients):
    tx = clients(AsyncClient, broker.address)
    for body in numbered(3):
        await tx.send("cap3", body, capacity=3)
    with pytest.raises(QueueFull) as info:
        await tx.send("cap3", b"3", capacity=3)
    assert info.value.channel == "cap3" and info.value.capacity == 3
    rx = clients(AsyncClient, broker.address)
    assert [await asyncio.wait_for(rx.receive("cap3"), 5) for _ in range(3)] == numbered(3)
    with pytest.raises(asyncio.TimeoutError):  # the refused one is not there
        await asyncio.wait_for(rx.receive("cap3"), 0.3)


def test_capacity_3_sync(broker, clients):
    tx = clients(SyncClient, broker.address)
    for body in numbered(3):
        tx.send("cap3.sync", body, capacity=3)
    with pytest.raises(QueueFull):
        tx.send("cap3.sync", b"3", capacity=3)


async def test_message_too_large(broker_factory, clients):
    # the broker's limit (1 MiB here), learned from its Hello reply, is
    # smaller than the client's (16 MiB by default): the smaller one applies
    broker = broker_factory(max_body=MiB)
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    exactly = os.urandom(MiB)
    await tx.send("big", exactly)
    assert await asyncio.wait_for(rx.receive("big"), 10) == exactly
    with pytest.raises(MessageTooLarge) as info:
        await tx.send("big", b"x" * (MiB + 1))
    assert info.value.size == MiB + 1 and info.value.limit == MiB
    with pytest.raises(MessageTooLarge):
        await tx.group_send("room", b"x" * (MiB + 1))


def test_message_too_large_sync(broker_factory, clients):
    broker = broker_factory(max_body=MiB)
    tx = clients(SyncClient, broker.address)
    with pytest.raises(MessageTooLarge):
        tx.send("big.sync", b"x" * (MiB + 1))
    tx.send("big.sync", b"x" * MiB)


def test_default_limit_is_16_mib(broker, clients):
    tx, rx = clients(SyncClient, broker.address), clients(SyncClient, broker.address)
    exactly = b"x" * (16 * MiB)
    tx.send("big16", exactly)
    assert rx.receive("big16", timeout=10) == exactly
    with pytest.raises(MessageTooLarge) as info:
        tx.send("big16", exactly + b"x")
    assert (info.value.size, info.value.limit) == (16 * MiB + 1, 16 * MiB)


def test_client_max_message_size_below_the_brokers(broker, clients):
    tx = clients(SyncClient, broker.address, max_message_size=1000)
    assert tx.wait_connected(5)
    with pytest.raises(MessageTooLarge) as info:
        tx.send("small", b"x" * 1001)
    assert (info.value.size, info.value.limit) == (1001, 1000)
    with pytest.raises(MessageTooLarge):
        tx.group_send("room", b"x" * 1001)
    tx.send("small", b"x" * 1000)
    assert tx.receive("small", timeout=5) == b"x" * 1000


# -- many loops, no leaks --------------------------------------------------------------
def test_1000_async_to_sync_sends_leak_nothing_and_lose_nothing(broker, clients):
    client = clients(AsyncClient, broker.address)
    send = async_to_sync(client.send)
    receive = async_to_sync(client.receive)
    send("warm", b"x")  # start the I/O thread and socket first
    assert receive("warm") == b"x"
    gc.collect()
    proc = psutil.Process()
    fds, threads = proc.num_fds(), proc.num_threads()

    expected = numbered(1000)
    for body in expected:
        send("a2s", body, capacity=10_000)
    got = [receive("a2s") for _ in expected]
    assert got == expected

    deadline = time.monotonic() + 5  # executor threads may take a moment to go
    while time.monotonic() < deadline:
        gc.collect()
        if proc.num_fds() <= fds and proc.num_threads() <= threads:
            break
        time.sleep(0.02)
    assert proc.num_fds() <= fds, "file descriptors leaked"
    assert proc.num_threads() <= threads, "threads leaked"


# -- no broker, restarted broker ----------------------------------------------------
async def test_no_broker_raises_broker_unavailable_within_timeout(clients):
    address = f"tcp://127.0.0.1:{free_port()}"
    client = clients(AsyncClient, address, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await client.send("nobody", b"x")
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5
    assert isinstance(info.value, TimeoutError)
    assert info.value.address == address and info.value.timeout == 0.5
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await client.group_add("room", "nobody")
    assert time.monotonic() - started < 1.5


def test_no_broker_raises_broker_unavailable_within_timeout_sync(clients):
    client = clients(SyncClient, f"tcp://127.0.0.1:{free_port()}", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.send("nobody", b"x")
    assert 0.4 <= time.monotonic() - started < 1.5


async def test_broker_restart_pending_receive_and_groups_survive(broker, broker_factory, clients):
    rx = clients(AsyncClient, broker.address, heartbeat=0.2)
    tx = clients(AsyncClient, broker.address, heartbeat=0.2)
    await rx.group_add("restart.room", "restart.inbox")
    assert await tx.group_send("restart.room", b"before") == (1, 0)
    assert await asyncio.wait_for(rx.receive("restart.inbox"), 5) == b"before"

    pending = asyncio.create_task(rx.receive("restart.inbox"))
    await until(lambda: ready_endpoints(broker, "restart.inbox") == 1)  # the old broker knows it
    address = broker.address
    await asyncio.to_thread(broker.stop)
    assert not pending.done()
    restarted = await asyncio.to_thread(broker_factory, address)
    assert restarted.address == address

    await tx.send("restart.inbox", b"after-restart")
    assert await asyncio.wait_for(pending, 10) == b"after-restart"

    # The membership added before the restart is replayed by rx.
    deadline = time.monotonic() + 10
    while True:
        sent, skipped = await tx.group_send("restart.room", b"group-after")
        if sent or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (sent, skipped) == (1, 0), "group membership was not replayed"
    assert await asyncio.wait_for(rx.receive("restart.inbox"), 5) == b"group-after"


async def test_a_client_the_broker_forgot_grants_its_credit_again(broker, clients):
    """The broker dropped a live client (it missed its heartbeats, say, or
    a send found it gone) and kept running: the client hears a Welcome from
    the same broker instance and says Hello again, so the credit it thinks
    is owed is granted afresh and a waiting receive still gets its message."""
    rx = clients(AsyncClient, broker.address, heartbeat=0.2)
    tx = clients(AsyncClient, broker.address, heartbeat=0.2)
    await tx.send("forgot", b"first")
    assert await asyncio.wait_for(rx.receive("forgot"), 5) == b"first"  # credit owed: prefetch - 1

    def drop() -> None:
        core = broker.server.broker
        [ident] = [i for i, c in core.clients.items() if c.client_id == rx.client_id]
        core.drop_client(ident)

    broker.call(drop)
    pending = asyncio.create_task(rx.receive("forgot"))
    await tx.send("forgot", b"second")
    assert await asyncio.wait_for(pending, 10) == b"second"


# -- a hostile peer -----------------------------------------------------------------
def _hostile_messages() -> list[tuple[str, list[bytes], int]]:
    """(name, frames, expected error code)."""
    proto = p.ProtocolError.code
    send = p.encode(p.Send(1, "hostile", 60, 10))
    random_junk = os.urandom(64)
    if random_junk[:1] == b"\x01":
        random_junk = b"\x00" + random_junk[1:]
    return [
        ("random bytes", [random_junk], proto),
        ("random after version", [b"\x01" + bytes([0xC1]) + os.urandom(32)], proto),
        ("truncated header", [send[:4]], proto),
        ("version only", [b"\x01"], proto),
        ("empty frame", [b""], proto),
        ("wrong version", [b"\x07" + send[1:], b"body"], proto),
        ("four frames", [p.encode(p.Heartbeat(2)), b"a", b"b"], proto),
        ("unknown tag", [b"\x01" + msgspec.msgpack.encode([99, 1, "x"])], proto),
        ("reply tag", [p.encode(p.Reply(1))], proto),
        ("deep nesting", [b"\x01\x93\x0a\x01" + b"\x91" * 200_000], proto),
        ("send without body", [send], proto),
        ("oversized 17 MiB", [send, b"x" * (17 * MiB)], MessageTooLarge.code),  # the default limit is 16 MiB
    ]


async def test_garbage_from_a_raw_dealer_gets_errors_and_the_broker_keeps_serving(broker, clients):
    tx, rx = clients(AsyncClient, broker.address), clients(AsyncClient, broker.address)
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(broker.address)
    stop = asyncio.Event()

    async def well_behaved() -> int:
        i = 0
        while not stop.is_set():
            await tx.send("good", b"%d" % i)
            assert await asyncio.wait_for(rx.receive("good"), 5) == b"%d" % i
            i += 1
        return i

    async def next_reply() -> p.Reply:
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            msg = p.decode_to_client(frames[0])
            if isinstance(msg, p.Reply):
                return msg
            assert isinstance(msg, p.Welcome)  # the broker may greet an unknown peer first

    serving = asyncio.create_task(well_behaved())
    try:
        for name, frames, code in _hostile_messages():
            await dealer.send_multipart(frames)
            reply = await next_reply()
            assert reply.code == code, (name, reply)
            error = from_wire(reply.code, reply.detail, reply.value)
            assert error.code == code and str(error), name
            assert not serving.done(), name
        await dealer.send_multipart([p.encode(p.Hello(77, "raw", 1.0))])
        reply = await next_reply()
        assert reply.req == 77 and reply.code == 0  # this peer is still served too
    finally:
        stop.set()
        done = await asyncio.wait_for(serving, 10)
        dealer.close(0)
        ctx.term()
    assert done > 0
    stats = await tx.stats()
    assert stats["errors"] >= len(_hostile_messages())


async def test_a_group_send_reaches_a_process_once_and_is_decoded_once(broker):
    """Over real ZeroMQ: three members in one process with credit get one
    Deliver with one body frame; their items share the bytes and the
    Shared slot, and the layer gives each receiver its own dict."""
    from django_message_broker.layer import ChannelsServerLayer

    layer = ChannelsServerLayer(address=broker.address, embedded=False, prefix="t")
    try:
        channels = [await layer.new_channel() for _ in range(3)]
        for channel in channels:
            await layer.group_add("room", channel)
            await layer.send(channel, {"type": "warm.up"})
            assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "warm.up"
        delivered = broker.call(lambda: broker.server.broker.counters["delivered"])
        await layer.group_send("room", {"type": "chat.message", "text": "hi"})
        state = layer.client.core.state
        buffers = [state.channels["t." + channel].buffer for channel in channels]
        await until(lambda: all(buffers))
        items = [buffer[0] for buffer in buffers]
        assert items[0][0] is items[1][0] is items[2][0]
        assert items[0][2] is not None and items[0][2] is items[1][2] is items[2][2]
        assert broker.call(lambda: broker.server.broker.counters["delivered"]) == delivered + 3
        got = [await asyncio.wait_for(layer.receive(channel), 5) for channel in channels]
        assert got == [{"type": "chat.message", "text": "hi"}] * 3
        assert len({id(message) for message in got}) == 3
    finally:
        await layer.close()
