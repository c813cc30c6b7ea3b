"""Pure unit tests of ``server.server_queue``: a fake clock and fake sockets,
no zmq I/O, no real sleeping."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from django_message_broker.exceptions import QueueFull, SubscriptionError
from django_message_broker.protocol import Deliver, decode_to_client
from django_message_broker.server.data_message import DataMessage
from django_message_broker.server.server_queue import ChannelQueue, Endpoint, RoundRobinDict
from helpers import FakeClock

# -- fakes ----------------------------------------------------------------------
OK, BUSY, GONE = "ok", "busy", "gone"


def ttls_of(msg: Deliver) -> list[float]:
    """Seconds left for each body of a Deliver (one ``ttl`` or a list ``ttls``)."""
    return list(msg.ttls) if hasattr(msg, "ttls") else [msg.ttl]


class FakeSocket:
    """A ROUTER socket stand-in for the standalone path (no sink): accepts
    frame-by-frame ``send(frame, flags)`` (``SNDMORE`` until the last
    frame). ``mode`` says what the next messages do; ``script`` (a list of
    modes) overrides it, one entry per message. As with
    ``ROUTER_MANDATORY``, only the first frame of a message can fail."""

    def __init__(self, mode: str = OK) -> None:
        self.mode = mode
        self.script: list[str] = []
        self.attempts = 0  # messages tried, failed or not
        self.flags: list[int] = []  # flags of every frame sent
        self.sent: list[tuple[list, Deliver, list]] = []  # (routing, header, bodies) that went out
        self.on_send: Any = None
        self._partial: list | None = None

    def _first_frame(self) -> None:
        self.attempts += 1
        mode = self.script.pop(0) if self.script else self.mode
        if mode == BUSY:
            raise zmq.Again()
        if mode == GONE:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)

    def send(self, frame: Any, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        if self._partial is None:
            self._first_frame()
            self._partial = []
        self.flags.append(int(flags))
        self._partial.append(bytes(frame.buffer) if hasattr(frame, "buffer") else bytes(frame))
        if not int(flags) & zmq.SNDMORE:
            frames, self._partial = self._partial, None
            self._complete(frames)

    def _complete(self, frames: list) -> None:
        routing, header, *bodies = frames
        msg = decode_to_client(header)
        assert isinstance(msg, Deliver)
        assert len(ttls_of(msg)) == len(bodies) >= 1
        self.sent.append(([routing], msg, bodies))
        if self.on_send is not None:
            self.on_send()

    @property
    def deliveries(self) -> list[tuple[bytes, bytes, float]]:
        """Every message that went out, in order: (dealer, body, ttl)."""
        return [
            (r[0], body, ttl) for r, msg, bodies in self.sent for body, ttl in zip(bodies, ttls_of(msg), strict=True)
        ]

    @property
    def bodies(self) -> list:
        return [body for _, body, _ in self.deliveries]

    def bodies_to(self, dealer: bytes) -> list:
        return [body for d, body, _ in self.deliveries if d == dealer]


def make_queue(
    name: bytes = b"chan", max_length: int | None = None, clock: FakeClock | None = None
) -> tuple[ChannelQueue, FakeClock]:
    clock = clock or FakeClock()
    return ChannelQueue(name, max_length, clock=clock), clock


def endpoint(name: str, channel: bytes = b"chan", socket: FakeSocket | None = None, **kw: Any) -> Endpoint:
    return Endpoint(socket or FakeSocket(), [name.encode()], channel, **kw)


def push_all(q: ChannelQueue, bodies: list, ttl: float | None = 60) -> None:
    for body in bodies:
        q.push(DataMessage(body), ttl)


def deliver_until_quiet(q: ChannelQueue, rounds: int = 50) -> None:
    """Call ``deliver`` until a call sends nothing (as the broker would,
    on each event and each retry tick)."""
    for _ in range(rounds):
        if not q.deliver():
            return
    raise AssertionError("deliver kept sending")


# -- delivery: exactly once, FIFO ---------------------------------------------
def test_every_message_reaches_exactly_one_endpoint_in_fifo_order():
    q, _ = make_queue()
    shared = FakeSocket()  # one ROUTER socket, many dealers
    for n in ("a", "b", "c"):
        q.subscribe(endpoint(n, socket=shared))
    bodies = [b"%d" % i for i in range(10)]
    push_all(q, bodies)
    assert q.deliver() == 10
    assert sorted(shared.bodies, key=int) == bodies  # each exactly once
    assert len(shared.bodies) == 10
    # Round robin, and each endpoint gets its share in FIFO order.
    assert shared.bodies_to(b"a") == [b"0", b"3", b"6", b"9"]
    assert shared.bodies_to(b"b") == [b"1", b"4", b"7"]
    assert shared.bodies_to(b"c") == [b"2", b"5", b"8"]
    assert all(msg.channel == "chan" for _, msg, _ in shared.sent)
    assert all(ttl == 60.0 for _, _, ttl in shared.deliveries)
    assert all(f & zmq.NOBLOCK for f in shared.flags)  # never blocks
    assert not q.queue


def test_single_endpoint_fifo_when_a_busy_delivery_is_retried():
    q, _ = make_queue()
    sock = FakeSocket()
    q.subscribe(endpoint("a", socket=sock))
    push_all(q, [b"1"])
    assert q.deliver() == 1
    push_all(q, [b"2", b"3"])
    sock.mode = BUSY
    assert q.deliver() == 0
    assert q.stalled is True
    assert [m.body for m in q.queue] == [b"2", b"3"]  # back at the head, in order
    push_all(q, [b"4"])
    assert [m.body for m in q.queue] == [b"2", b"3", b"4"]  # new ones behind them
    sock.mode = OK
    deliver_until_quiet(q)
    assert q.stalled is False
    assert sock.bodies == [b"1", b"2", b"3", b"4"]  # FIFO, nothing twice


def test_fifo_per_endpoint_when_another_endpoint_is_busy():
    """b must see its messages in queue order even while a's deliveries
    fail and go back to the head of the queue."""
    q, _ = make_queue()
    sa, sb = FakeSocket(BUSY), FakeSocket()
    q.subscribe(endpoint("a", socket=sa))
    q.subscribe(endpoint("b", socket=sb))
    push_all(q, [b"%d" % i for i in range(6)])
    for _ in range(10):
        q.deliver()
    assert sa.bodies == []
    assert sb.bodies == [b"%d" % i for i in range(6)]  # everything, once, in order
    assert not q.queue


def test_fifo_per_endpoint_when_another_endpoint_is_gone():
    q, _ = make_queue()
    sa, sb = FakeSocket(GONE), FakeSocket()
    a, b = endpoint("a", socket=sa), endpoint("b", socket=sb)
    q.subscribe(a)
    q.subscribe(b)
    push_all(q, [b"%d" % i for i in range(6)])
    deliver_until_quiet(q)
    assert a.id not in q.subscribers and b.id in q.subscribers  # unreachable: dropped
    assert sb.bodies == [b"%d" % i for i in range(6)]
    assert not q.queue


def test_unreachable_endpoint_is_dropped_and_its_messages_kept():
    q, _ = make_queue()
    sa = FakeSocket(GONE)
    a = endpoint("a", socket=sa)
    q.subscribe(a)
    push_all(q, [b"1", b"2"])
    assert q.deliver() == 0
    assert a.id not in q.subscribers
    assert [m.body for m in q.queue] == [b"1", b"2"]
    sb = FakeSocket()
    q.subscribe(endpoint("b", socket=sb))
    deliver_until_quiet(q)
    assert sb.bodies == [b"1", b"2"]


def test_no_endpoint_keeps_messages_queued():
    q, _ = make_queue()
    push_all(q, [b"1"])
    assert q.deliver() == 0
    assert [m.body for m in q.queue] == [b"1"]


def test_deliver_limit():
    q, _ = make_queue()
    sock = FakeSocket()
    q.subscribe(endpoint("a", socket=sock))
    push_all(q, [b"1", b"2", b"3"])
    assert q.deliver(limit=2) == 2
    assert sock.bodies == [b"1", b"2"] and len(q.queue) == 1


def test_push_front_puts_a_message_back_at_the_head():
    q, clock = make_queue()
    sock = FakeSocket()
    push_all(q, [b"2", b"3"])
    q.push_front(DataMessage(b"1", clock.now + 5))
    q.subscribe(endpoint("a", socket=sock))
    q.deliver()
    assert sock.bodies == [b"1", b"2", b"3"]
    assert sock.deliveries[0][2] == pytest.approx(5)


# -- round robin ----------------------------------------------------------------
def test_round_robin_in_subscription_order_starting_with_the_first():
    q, _ = make_queue()
    socks = {n: FakeSocket() for n in ("a", "b", "c")}
    for n, s in socks.items():
        q.subscribe(endpoint(n, socket=s))
    push_all(q, [b"%d" % i for i in range(7)])
    q.deliver()
    assert socks["a"].bodies == [b"0", b"3", b"6"]
    assert socks["b"].bodies == [b"1", b"4"]
    assert socks["c"].bodies == [b"2", b"5"]


def test_resubscribing_endpoint_moves_to_the_end_of_the_round():
    q, _ = make_queue()
    shared = FakeSocket()
    for n in ("a", "b", "c"):
        q.subscribe(endpoint(n, socket=shared))
    q.subscribe(endpoint("a", socket=shared))  # again: goes last
    assert len(q.subscribers) == 3
    push_all(q, [b"%d" % i for i in range(6)])
    q.deliver()
    assert shared.bodies_to(b"b") == [b"0", b"3"]
    assert shared.bodies_to(b"c") == [b"1", b"4"]
    assert shared.bodies_to(b"a") == [b"2", b"5"]


def test_grant_keeps_the_endpoint_in_its_place():
    q, _ = make_queue()
    shared = FakeSocket()
    q.grant(endpoint("a", socket=shared), 5)
    q.grant(endpoint("b", socket=shared), 5)
    q.grant(endpoint("a", socket=shared), 1)  # more credit, same place
    push_all(q, [b"%d" % i for i in range(4)])
    q.deliver()
    assert shared.bodies_to(b"a") == [b"0", b"2"]
    assert shared.bodies_to(b"b") == [b"1", b"3"]


# -- credit ---------------------------------------------------------------------
def test_credit_limits_deliveries():
    q, _ = make_queue()
    sa, sb = FakeSocket(), FakeSocket()
    a = q.grant(endpoint("a", socket=sa), 2)
    b = q.grant(endpoint("b", socket=sb), 1)
    push_all(q, [b"%d" % i for i in range(6)])
    assert q.deliver() == 3
    assert sa.bodies == [b"0", b"2"] and sb.bodies == [b"1"]
    assert a.credit == 0 and b.credit == 0
    assert len(q.queue) == 3
    assert q.deliver() == 0  # nobody has credit: nothing moves
    q.grant(endpoint("b", socket=sb), 2)
    assert q.deliver() == 2
    assert sb.bodies == [b"1", b"3", b"4"]
    assert [m.body for m in q.queue] == [b"5"]


def test_failed_delivery_spends_no_credit():
    q, _ = make_queue()
    sock = FakeSocket()
    a = q.grant(endpoint("a", socket=sock), 1)
    push_all(q, [b"1"])
    sock.script = [BUSY]
    assert q.deliver() == 0
    assert a.credit == 1
    assert q.deliver() == 1 and a.credit == 0


def test_subscribe_grants_unlimited_credit():
    q, _ = make_queue()
    sock = FakeSocket()
    ep = endpoint("a", socket=sock)
    q.subscribe(ep)
    assert ep.credit is None
    push_all(q, [b"x"] * 50)
    assert q.deliver() == 50


# -- process channels -----------------------------------------------------------
def test_process_channel_has_one_endpoint():
    q, _ = make_queue(b"proc.abc!")
    assert q.is_process_channel
    q.subscribe(endpoint("a", b"proc.abc!", is_process_channel=True))
    with pytest.raises(SubscriptionError):
        q.subscribe(endpoint("b", b"proc.abc!", is_process_channel=True))  # a second endpoint
    with pytest.raises(SubscriptionError):
        q.subscribe(endpoint("a", b"proc.abc!other", is_process_channel=True))  # a changed endpoint
    assert len(q.subscribers) == 1


def test_process_channel_resubscribe_renews_expiry():
    q, clock = make_queue(b"p!x")
    ep = endpoint("a", b"p!x", time_to_live=10, is_process_channel=True)
    q.subscribe(ep)
    first_deadline, first_expiry = ep.deadline, ep.expiry
    assert first_deadline == clock.now + 10 and first_expiry is not None
    clock.advance(8)
    q.subscribe(endpoint("a", b"p!x", time_to_live=10, is_process_channel=True))  # same endpoint: fine
    stored = q.subscribers[ep.id]
    assert stored.deadline == clock.now + 10 > first_deadline
    assert stored.expiry is not None and stored.expiry > first_expiry
    clock.advance(5)  # past the first deadline, before the renewed one
    q._flush_subscribers()
    assert ep.id in q.subscribers
    clock.advance(5)
    q._flush_subscribers()
    assert ep.id not in q.subscribers


def test_normal_channel_cannot_become_a_process_channel_with_other_endpoints():
    q, _ = make_queue(b"normal")
    q.subscribe(endpoint("a", b"normal"))
    with pytest.raises(SubscriptionError):
        q.subscribe(endpoint("b", b"normal", is_process_channel=True))


# -- limits and expiry ----------------------------------------------------------
def test_max_length_raises_typed_queue_full():
    q, clock = make_queue(b"full", max_length=2)
    push_all(q, [b"1"], ttl=5)
    push_all(q, [b"2"], ttl=60)
    with pytest.raises(QueueFull) as info:
        q.push(DataMessage(b"3"))
    assert type(info.value) is QueueFull
    assert info.value.channel == "full" and info.value.capacity == 2
    assert [m.body for m in q.queue] == [b"1", b"2"]
    clock.advance(5)  # message 1 expires: room again
    q.push(DataMessage(b"3"))
    assert [m.body for m in q.queue] == [b"2", b"3"]


def test_expired_message_is_never_delivered():
    q, clock = make_queue()
    sock = FakeSocket()
    q.push(DataMessage(b"short"), 1)
    q.push(DataMessage(b"long"), 100)
    q.push(DataMessage(b"forever"), None)
    clock.advance(1)  # exactly at the deadline: expired
    q.subscribe(endpoint("a", socket=sock))
    assert q.deliver() == 2
    assert sock.bodies == [b"long", b"forever"]
    assert q.expired == 1
    assert sock.deliveries[0][2] == pytest.approx(99)  # seconds left travel with the message
    assert sock.deliveries[1][2] == math.inf


def test_flush_messages_drops_only_expired():
    q, clock = make_queue()
    q.push(DataMessage(b"1"), 1)
    q.push(DataMessage(b"2"), 3)
    q.push(DataMessage(b"3"), 2)
    clock.advance(2)
    q._flush_messages()
    assert [m.body for m in q.queue] == [b"2"]
    assert q.expired == 2


def test_expired_endpoint_is_dropped_by_flush_subscribers():
    q, clock = make_queue()
    short = endpoint("a", time_to_live=10)
    forever = endpoint("b", time_to_live=None)
    q.subscribe(short)
    q.subscribe(forever)
    clock.advance(9.5)
    q._flush_subscribers()
    assert short.id in q.subscribers
    clock.advance(0.5)
    q._flush_subscribers()
    assert short.id not in q.subscribers
    assert forever.id in q.subscribers
    clock.advance(10**9)
    q._flush_subscribers()
    assert forever.id in q.subscribers


def test_discard_unknown_endpoint_raises():
    q, _ = make_queue()
    with pytest.raises(SubscriptionError):
        q.discard(endpoint("nobody"))
    ep = endpoint("a")
    q.subscribe(ep)
    q.discard(endpoint("a"))  # by id
    assert not q.subscribers
    with pytest.raises(SubscriptionError):
        q.discard(ep)


def test_is_empty():
    q, _ = make_queue()
    assert q.is_empty()
    ep = endpoint("a")
    q.subscribe(ep)
    assert not q.is_empty()
    q.discard(ep)
    assert q.is_empty()
    q.push(DataMessage(b"x"))
    assert not q.is_empty()
    q.subscribe(ep)
    q.deliver()
    assert not q.is_empty()  # the subscriber remains
    q.discard(ep)
    assert q.is_empty()


# -- the opt-in event loop ------------------------------------------------------
async def test_stop_is_idempotent_and_leaves_no_task_behind():
    q, _ = make_queue()
    task = asyncio.create_task(q.event_loop())
    await asyncio.sleep(0)  # let it start waiting
    assert not task.done()
    q.stop()
    q.stop()
    await asyncio.wait_for(task, 1)
    assert task.done() and not task.cancelled() and task.exception() is None
    assert q._task is None
    assert asyncio.all_tasks() == {asyncio.current_task()}
    q.stop()  # still fine after the loop is gone
    # A stopped queue's event loop returns at once.
    await asyncio.wait_for(q.event_loop(), 1)


async def test_stop_before_event_loop_runs():
    q, _ = make_queue()
    q.stop()
    await asyncio.wait_for(q.event_loop(), 1)
    assert q._task is None


async def test_event_loop_delivers_standalone():
    q, _ = make_queue()
    q.penalty = 0  # no real sleep after a busy peer
    sock = FakeSocket()
    all_sent = asyncio.Event()
    sock.on_send = lambda: len(sock.bodies) == 5 and all_sent.set()
    task = asyncio.create_task(q.event_loop())
    try:
        await asyncio.sleep(0)
        push_all(q, [b"%d" % i for i in range(3)])  # messages before any subscriber
        await asyncio.sleep(0)
        assert sock.bodies == []
        sock.script = [BUSY, OK, BUSY]
        q.subscribe(endpoint("a", socket=sock))
        push_all(q, [b"3", b"4"])
        await asyncio.wait_for(all_sent.wait(), 2)
        assert sock.bodies == [b"0", b"1", b"2", b"3", b"4"]
        assert not task.done()
    finally:
        q.stop()
        await asyncio.wait_for(task, 1)


async def test_event_loop_propagates_foreign_cancellation():
    q, _ = make_queue()
    task = asyncio.create_task(q.event_loop())
    await asyncio.sleep(0)
    task.cancel()  # not via stop(): the cancellation is not swallowed
    with pytest.raises(asyncio.CancelledError):
        await task
    assert q._task is None


async def test_pull_and_send_sends_one_message():
    q, _ = make_queue()
    sock = FakeSocket()
    q.subscribe(endpoint("a", socket=sock))
    push_all(q, [b"1", b"2"])
    await q.pull_and_send()
    assert sock.bodies == [b"1"]
    await q.pull_and_send()
    assert sock.bodies == [b"1", b"2"]
    await q.pull_and_send()  # nothing left: no error
    assert len(sock.bodies) == 2


async def test_pull_and_send_waits_the_penalty_when_busy(monkeypatch):
    q, _ = make_queue()
    sock = FakeSocket(BUSY)
    q.subscribe(endpoint("a", socket=sock))
    push_all(q, [b"1"])
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    await q.pull_and_send()
    assert slept == [q.penalty] and q.penalty > 0
    assert [m.body for m in q.queue] == [b"1"]


# -- property tests -------------------------------------------------------------
ENDPOINTS = ("a", "b", "c")


class QueueMachine(RuleBasedStateMachine):
    """Random pushes, subscriptions, grants, discards, deliveries, failures
    and clock advances against a model of what was pushed."""

    @initialize(max_length=st.one_of(st.none(), st.integers(1, 6)))
    def setup(self, max_length):
        self.q, self.clock = make_queue(b"chan", max_length)
        self.sockets = {n: FakeSocket() for n in ENDPOINTS}
        self.pushed: list[tuple[int, float]] = []  # (id, deadline)
        self.delivered: list[tuple[int, float, str]] = []  # (id, time of delivery, endpoint)
        self.next_id = 0
        for name, sock in self.sockets.items():
            sock.on_send = lambda name=name: self._record(name)

    def _record(self, name):
        routing, msg, bodies = self.sockets[name].sent[-1]
        assert routing == [name.encode()]
        assert msg.channel == "chan"
        for body, ttl in zip(bodies, ttls_of(msg), strict=True):
            self.delivered.append((int(body), self.clock.now, name))
            deadline = self.pushed[int(body)][1]
            assert ttl == pytest.approx(deadline - self.clock.now) or ttl == deadline == math.inf

    @rule(ttl=st.sampled_from([None, 1.0, 2.0, 3.0, 5.0, 20.0]))
    def push(self, ttl):
        msg_id = self.next_id
        try:
            self.q.push(DataMessage(b"%d" % msg_id), ttl)
        except QueueFull:
            assert self.q.max_length is not None
            assert len(self.q.queue) >= self.q.max_length
            return
        self.next_id += 1
        self.pushed.append((msg_id, self.clock.now + ttl if ttl else math.inf))

    @rule(name=st.sampled_from(ENDPOINTS), ttl=st.one_of(st.none(), st.integers(1, 30)))
    def subscribe(self, name, ttl):
        self.q.subscribe(endpoint(name, socket=self.sockets[name], time_to_live=ttl))

    @rule(name=st.sampled_from(ENDPOINTS), credit=st.integers(0, 4), ttl=st.one_of(st.none(), st.integers(1, 30)))
    def grant(self, name, credit, ttl):
        self.q.grant(endpoint(name, socket=self.sockets[name], time_to_live=ttl), credit)

    @rule(name=st.sampled_from(ENDPOINTS))
    def discard(self, name):
        ep = endpoint(name, socket=self.sockets[name])
        if ep.id in self.q.subscribers:
            self.q.discard(ep)
        else:
            with pytest.raises(SubscriptionError):
                self.q.discard(ep)

    @rule(name=st.sampled_from(ENDPOINTS), mode=st.sampled_from([OK, OK, BUSY, GONE]))
    def set_mode(self, name, mode):
        self.sockets[name].mode = mode

    @rule(limit=st.one_of(st.none(), st.integers(1, 3)))
    def deliver(self, limit):
        before = len(self.delivered)
        sent = self.q.deliver(limit)
        assert sent == len(self.delivered) - before
        if limit is not None:
            assert sent <= limit

    @rule(seconds=st.sampled_from([0, 1, 2, 3, 5, 15]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def flush_messages(self):
        self.q._flush_messages()

    @rule()
    def flush_subscribers(self):
        self.q._flush_subscribers()
        for ep in self.q.subscribers.values():
            assert ep.deadline > self.clock.now

    @invariant()
    def delivered_is_a_fifo_subsequence_without_duplicates(self):
        ids = [i for i, _, _ in self.delivered]
        assert len(set(ids)) == len(ids)  # no duplicates
        for name in ENDPOINTS:  # what each endpoint sees is in push order
            seen = [i for i, _, who in self.delivered if who == name]
            assert seen == sorted(seen), f"{name} saw {seen}"

    @invariant()
    def nothing_expired_was_delivered(self):
        for msg_id, when, _ in self.delivered:
            assert when < self.pushed[msg_id][1]

    @invariant()
    def nothing_lost_that_had_not_expired(self):
        delivered = {i for i, _, _ in self.delivered}
        queued = [int(m.body) for m in self.q.queue]
        assert queued == sorted(queued) and not delivered & set(queued)
        for msg_id, deadline in self.pushed:
            if msg_id not in delivered and msg_id not in queued:
                assert deadline <= self.clock.now, f"message {msg_id} lost"
        assert len(queued) + len(delivered) + self.q.expired >= len(self.pushed)

    @invariant()
    def max_length_holds(self):
        if self.q.max_length is not None:
            assert len(self.q.queue) <= self.q.max_length


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=100, stateful_step_count=35, deadline=None)


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(st.tuples(st.sampled_from(ENDPOINTS), st.integers(1, 3)), min_size=1, max_size=6),
    n=st.integers(0, 30),
)
def test_credit_is_never_exceeded_and_everything_with_credit_moves(plan, n):
    q, _ = make_queue()
    socks = {name: FakeSocket() for name in ENDPOINTS}
    total: dict[str, int] = {}
    for name, credit in plan:
        q.grant(endpoint(name, socket=socks[name]), credit)
        total[name] = total.get(name, 0) + credit
    push_all(q, [b"%d" % i for i in range(n)])
    sent = q.deliver()
    assert sent == min(n, sum(total.values()))
    for name in ENDPOINTS:
        assert len(socks[name].bodies) <= total.get(name, 0)
    merged = sorted(int(b) for s in socks.values() for b in s.bodies)
    assert merged == list(range(sent))


# -- RoundRobinDict ---------------------------------------------------------------
class RoundRobinMachine(RuleBasedStateMachine):
    """Compare with a model: a list in insertion order and the position of the
    entry the next ``__next__`` returns."""

    def __init__(self):
        super().__init__()
        self.d = RoundRobinDict()
        self.order: list[int] = []
        self.pos = 0

    keys = st.integers(0, 8)

    @rule(key=keys, value=st.integers())
    def set(self, key, value):
        self.d[key] = value
        if key not in self.order:
            self.order.append(key)
        self.values = getattr(self, "values", {})
        self.values[key] = value

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def delete(self, data):
        key = data.draw(st.sampled_from(self.order))
        i = self.order.index(key)
        del self.d[key]
        del self.order[i]
        del self.values[key]
        if i < self.pos:
            self.pos -= 1

    @rule(key=keys)
    def delete_missing(self, key):
        assume(key not in self.order)
        with pytest.raises(KeyError):
            del self.d[key]

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def move_to_end(self, data):
        key = data.draw(st.sampled_from(self.order))
        i = self.order.index(key)
        self.d.move_to_end(key)
        del self.order[i]
        if i < self.pos:
            self.pos -= 1
        self.order.append(key)

    @rule()
    def next(self):
        got = next(self.d)
        if not self.order:
            assert got is None
            return
        if self.pos >= len(self.order):
            self.pos = 0
        assert got == self.values[self.order[self.pos]]
        self.pos += 1

    @invariant()
    def same_contents_and_order(self):
        assert list(self.d) == self.order
        assert self.d.first_key() == (self.order[0] if self.order else None)

    @invariant()
    def a_full_round_visits_every_entry_once(self):
        # Probe a copy: a round of len(d) calls returns every value exactly once.
        if not self.order:
            return
        probe = RoundRobinDict()
        probe.data = dict(self.d.data)
        probe.index = self.d.index
        keys = [next(probe) for _ in range(len(self.order))]
        assert sorted(map(repr, keys)) == sorted(repr(self.values[k]) for k in self.order)
        # ...and it starts where the real one would.
        expected_first = self.order[self.pos] if self.pos < len(self.order) else self.order[0]
        assert keys[0] == self.values[expected_first]


TestRoundRobinMachine = RoundRobinMachine.TestCase
TestRoundRobinMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.text(max_size=3), unique=True, min_size=1, max_size=10), rounds=st.integers(1, 4))
def test_round_robin_cycles_in_insertion_order_from_the_first(keys, rounds):
    d = RoundRobinDict()
    for i, k in enumerate(keys):
        d[k] = i
    assert d.first_key() == keys[0]
    assert [next(d) for _ in range(len(keys) * rounds)] == list(range(len(keys))) * rounds


def test_next_ready_skips_endpoints_without_credit():
    d = RoundRobinDict()
    eps = [endpoint(n) for n in ("a", "b", "c")]
    for ep in eps:
        d[ep.id] = ep
    eps[0].credit, eps[1].credit, eps[2].credit = 0, 1, None
    assert [d.next_ready() for _ in range(4)] == [eps[1], eps[2], eps[1], eps[2]]
    eps[1].credit = eps[2].credit = 0
    assert d.next_ready() is None
    assert RoundRobinDict().next_ready() is None


# -- with a sink (the broker's path) ------------------------------------------------
class ListSink:
    """Takes runs as the broker's Outbox does: a list, no I/O."""

    def __init__(self) -> None:
        self.runs: list[tuple[ChannelQueue, Endpoint, list[DataMessage]]] = []

    def defer(self, queue: ChannelQueue, endpoint: Endpoint, messages: list[DataMessage]) -> None:
        self.runs.append((queue, endpoint, messages))


def test_deliver_hands_runs_to_the_sink_and_never_touches_the_socket():
    q, _ = make_queue()
    sock = FakeSocket(GONE)  # would fail if used
    ep = endpoint("a", socket=sock)
    q.grant(ep, 3)
    push_all(q, [b"1", b"2", b"3", b"4"])
    sink = ListSink()
    assert q.deliver(sink=sink) == 3
    assert [(e, [m.body for m in ms]) for _, e, ms in sink.runs] == [(ep, [b"1", b"2", b"3"])]
    assert sock.attempts == 0
    assert ep.held == q.held == 3 and ep.credit == 0 and len(q.queue) == 1


@pytest.mark.parametrize("gone", [False, True])
def test_requeue_puts_a_run_back_at_the_head_exactly(gone):
    q, _ = make_queue()
    ep = endpoint("a")
    q.grant(ep, 2)
    push_all(q, [b"1", b"2", b"3"])
    sink = ListSink()
    q.deliver(sink=sink)
    used = q.meter.used
    [(_, _, run)] = sink.runs
    q.requeue(ep, run, gone=gone)
    assert [m.body for m in q.queue] == [b"1", b"2", b"3"]
    assert q.meter.used == used + sum(m.size for m in run)
    assert ep.held == q.held == 0
    if gone:
        assert ep.id not in q.subscribers
    else:
        assert ep.credit == 2 and q.stalled and ep.id in q.subscribers


def test_endpoints_without_a_time_to_live_never_expire_and_cost_no_scan():
    q, clock = make_queue()
    q.subscribe(endpoint("a", time_to_live=None))
    assert not q.endpoints_expire and q.expire_endpoints(math.inf) == 0 and q.subscribers
    q.subscribe(endpoint("b", time_to_live=5))  # one that expires: the scan runs
    assert q.endpoints_expire
    assert q.expire_endpoints(clock.now + 6) == 1 and len(q.subscribers) == 1


def test_expire_looks_at_messages_only_once_one_may_have_expired():
    """``next_deadline`` is a lower bound of the queue's deadlines: before
    it, ``expire`` scans nothing; messages put back keep it true."""
    q, clock = make_queue()
    push_all(q, [b"a", b"b"], ttl=100)
    assert q.next_deadline == clock.now + 100
    back = DataMessage(b"back", clock.now + 10)  # handed back unread, with an earlier deadline
    q.push_front(back)
    run = [DataMessage(b"run", clock.now + 5)]
    q.put_back(run)
    assert q.next_deadline == clock.now + 5
    assert q.expire(clock.now + 4) == 0
    assert q.expire(clock.now + 5) == 1 and q.next_deadline == clock.now + 10  # exact after a scan
    assert q.expire(clock.now + 20) == 1 and [m.body for m in q.queue] == [b"a", b"b"]
    q.push(DataMessage(b"forever"), None)
    assert q.next_deadline == clock.now + 100
    q.clear()
    assert q.next_deadline == math.inf and q.expire(clock.now + 1000) == 0


def test_expire_and_expire_endpoints_take_now():
    q, clock = make_queue()
    q.subscribe(endpoint("a", time_to_live=5))
    push_all(q, [b"old"], ttl=1)
    push_all(q, [b"new"], ttl=100)
    assert q.expire(clock.now + 2) == 1 and [m.body for m in q.queue] == [b"new"]
    assert q.expire_endpoints(clock.now + 2) == 0
    assert q.expire_endpoints(clock.now + 6) == 1 and not q.subscribers
