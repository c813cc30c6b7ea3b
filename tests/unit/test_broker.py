"""``server.broker.Broker``, the sans-IO routing core, driven directly: frames
in, ``data_to_send()`` out, time passed in as ``now``. No zmq, no asyncio."""

from __future__ import annotations

from typing import Any

import pytest

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.server.broker import BUSY, GONE, Broker
from helpers import Wire

A, B, C = b"client-a", b"client-b", b"client-c"
V = bytes([p.VERSION])


class Rig:
    def __init__(self, **options: Any) -> None:
        self.now = 100.0
        self.broker = Broker(clock=lambda: self.now, **options)
        self.wire = Wire(self.broker)

    def handle(self, ident: bytes, cmd: Any, *bodies: bytes) -> None:
        """One message in; what it decided goes out (the shell sends after each batch)."""
        self.broker.handle([ident, p.encode(cmd), *bodies], self.now)
        self.wire.pump()

    def retry_stalled(self) -> None:
        self.broker.retry_stalled()
        self.wire.pump()

    def hello(self, *idents: bytes, heartbeat: float = 1.0) -> None:
        for ident in idents:
            self.handle(ident, p.Hello(1, ident.decode(), heartbeat))
            [reply] = self.wire.replies(ident)
            assert reply.code == 0

    def send(
        self,
        ident: bytes,
        channel: str,
        *bodies: bytes,
        req: int = 1,
        ttl: float = 60,
        capacity: int = 100,
        checked: bool = True,
    ) -> None:
        self.handle(ident, p.Send(req, channel, ttl, capacity, checked), *bodies)

    def error(self, ident: bytes) -> ex.BrokerError:
        [reply] = self.wire.replies(ident)
        assert reply.code != 0, reply
        return ex.from_wire(reply.code, reply.detail, reply.value)


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- connection -----------------------------------------------------------------
def test_hello_is_answered_with_instance_max_body_and_flush_epoch(rig):
    rig.handle(A, p.Hello(7, "client-a", 1.0))
    [(reply, bodies)] = rig.wire.take(A)
    assert reply == p.Reply(7, 0, "", [rig.broker.instance, rig.broker.max_body, rig.broker.epoch])
    assert bodies == []
    assert A in rig.broker.clients and rig.broker.clients[A].client_id == "client-a"


def test_unknown_peer_is_welcomed_before_its_answer(rig):
    rig.handle(A, p.Heartbeat(3))
    msgs = [m for m, _ in rig.wire.take(A)]
    assert msgs == [p.Welcome(rig.broker.instance, rig.broker.max_body), p.Reply(3, 0, "", rig.broker.instance)]
    rig.handle(A, p.Heartbeat(4))  # known now: no second Welcome
    assert [m for m, _ in rig.wire.take(A)] == [p.Reply(4, 0, "", rig.broker.instance)]


def test_two_brokers_have_different_instances():
    assert Rig().broker.instance != Rig().broker.instance


# -- send, subscribe, deliver ---------------------------------------------------
def test_send_then_subscribe_delivers(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"one", req=5)
    assert rig.wire.replies(A) == [p.Reply(5, 0, "", 1)]  # checked: the depth comes back
    rig.handle(B, p.Subscribe(0, "ch", 5))
    [(msg, bodies)] = rig.wire.take(B)
    assert isinstance(msg, p.Deliver) and msg.channel == "ch"
    assert bodies == [b"one"]
    assert list(msg.ttls) == [pytest.approx(60)]
    assert rig.wire.take(B) == [] and rig.broker.queued() == 0


def test_subscribe_then_send_delivers_at_once(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    assert rig.wire.take(B) == []  # Subscribe has no answer
    rig.send(A, "ch", b"x", req=2)
    assert rig.wire.delivered(B) == [b"x"]
    # The depth counts the message B holds and has not reported consumed.
    assert rig.wire.replies(A) == [p.Reply(2, 0, "", 1)]


def test_ttl_left_travels_with_the_delivery(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"x", ttl=10)
    rig.now += 4
    rig.handle(B, p.Subscribe(0, "ch", 1))
    [(msg, _)] = rig.wire.take(B)
    assert list(msg.ttls) == [pytest.approx(6)]


def test_credit_limits_deliveries_and_fifo(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 2))
    for i in range(5):
        rig.send(A, "ch", b"%d" % i)
    assert rig.wire.delivered(B) == [b"0", b"1"]
    assert rig.broker.queued() == 3
    rig.handle(B, p.Subscribe(0, "ch", 10))
    assert rig.wire.delivered(B) == [b"2", b"3", b"4"]


def test_two_consumers_each_message_once(rig):
    rig.hello(A, B, C)
    rig.handle(B, p.Subscribe(0, "ch", 100))
    rig.handle(C, p.Subscribe(0, "ch", 100))
    for i in range(10):
        rig.send(A, "ch", b"%d" % i)
    got_b, got_c = rig.wire.delivered(B), rig.wire.delivered(C)
    assert sorted(got_b + got_c, key=int) == [b"%d" % i for i in range(10)]
    assert got_b == sorted(got_b, key=int) and got_c == sorted(got_c, key=int)
    assert got_b and got_c  # round robin: both got some


def test_multi_body_send_is_queued_in_order(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"1", b"2", b"3", req=9)
    assert rig.wire.replies(A) == [p.Reply(9, 0, "", 3)]
    rig.handle(B, p.Subscribe(0, "ch", 10))
    assert rig.wire.delivered(B) == [b"1", b"2", b"3"]


def test_unsubscribe_returns_unused_credit_and_stops_deliveries(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.send(A, "ch", b"1")
    rig.wire.take(B)
    rig.handle(B, p.Unsubscribe(4, "ch"))
    assert rig.wire.replies(B) == [p.Reply(4, 0, "", 4)]
    rig.send(A, "ch", b"2")
    assert rig.wire.take(B) == []
    assert rig.broker.queued() == 1
    rig.handle(B, p.Unsubscribe(5, "ch"))  # not subscribed: fine, nothing left
    assert rig.wire.replies(B) == [p.Reply(5, 0, "", 0)]


def test_process_channel_takes_one_client(rig):
    rig.hello(B, C)
    rig.handle(B, p.Subscribe(0, "proc.b!", 5))
    rig.handle(C, p.Subscribe(6, "proc.b!", 5))
    err = rig.error(C)
    assert type(err) is ex.SubscriptionError
    rig.handle(B, p.Subscribe(0, "proc.b!", 5))  # the owner may grant more
    assert rig.wire.take(B) == []


# -- limits ---------------------------------------------------------------------
def test_checked_send_refused_at_capacity(rig):
    rig.hello(A)
    for i in range(3):
        rig.send(A, "ch", b"x", req=i + 1, capacity=3)
        assert rig.wire.replies(A) == [p.Reply(i + 1, 0, "", i + 1)]
    rig.send(A, "ch", b"x", req=4, capacity=3)
    [reply] = rig.wire.replies(A)
    assert reply.req == 4
    err = ex.from_wire(reply.code, reply.detail, reply.value)
    assert type(err) is ex.QueueFull and err.channel == "ch" and err.capacity == 3
    assert rig.broker.queued() == 3
    assert rig.broker.counters["refused_full"] == 1


def test_checked_multi_body_send_is_all_or_nothing(rig):
    rig.hello(A)
    rig.send(A, "ch", b"1", capacity=3)
    rig.wire.take(A)
    rig.send(A, "ch", b"2", b"3", b"4", capacity=3)
    assert type(rig.error(A)) is ex.QueueFull
    assert rig.broker.queued() == 1


def test_expired_messages_make_room(rig):
    rig.hello(A)
    rig.send(A, "ch", b"old", ttl=1, capacity=1)
    rig.now += 1
    rig.send(A, "ch", b"new", req=2, capacity=1)
    assert rig.wire.replies(A)[-1] == p.Reply(2, 0, "", 1)


def test_unchecked_send_is_silent_until_twice_the_capacity(rig):
    rig.hello(A)
    for _ in range(4):
        rig.send(A, "ch", b"x", capacity=2, checked=False)
    assert rig.wire.take(A) == []  # pipelined: no answers
    rig.send(A, "ch", b"x", req=0, capacity=2, checked=False)
    err = rig.error(A)
    assert type(err) is ex.QueueFull and err.capacity == 2
    assert rig.broker.queued() == 4


def test_message_too_large():
    rig = Rig(max_body=10)
    rig.hello(A)
    rig.send(A, "ch", b"x" * 10, req=1)
    assert rig.wire.replies(A) == [p.Reply(1, 0, "", 1)]
    rig.send(A, "ch", b"x" * 11, req=2)
    err = rig.error(A)
    assert type(err) is ex.MessageTooLarge and (err.size, err.limit) == (11, 10)
    rig.handle(A, p.GroupSend(3, "g", 60, 10), b"x" * 11)
    assert type(rig.error(A)) is ex.MessageTooLarge
    assert rig.broker.queued() == 1


def test_max_queue_length_is_a_hard_cap():
    rig = Rig(max_queue_length=2)
    rig.hello(A)
    for req in (1, 2, 3):
        rig.send(A, "ch", b"x", req=req, capacity=100)
    replies = rig.wire.replies(A)
    assert [r.code for r in replies] == [0, 0, ex.QueueFull.code]
    assert rig.broker.queued() == 2


@pytest.mark.parametrize(
    "cmd",
    [
        p.Send(1, "a b", 60, 10),
        p.Subscribe(1, "a!b!c", 1),
        p.GroupAdd(1, "g", "bad name", 60),
        p.GroupAdd(1, "bad group", "ch", 60),
        p.GroupDiscard(1, "g!", "ch"),
        p.GroupSend(1, "g\n", 60, 10),
    ],
    ids=lambda c: type(c).__name__,
)
def test_invalid_names_are_refused(rig, cmd):
    rig.hello(A)
    rig.handle(A, cmd, *([b"body"] if isinstance(cmd, (p.Send, p.GroupSend)) else []))
    err = rig.error(A)
    assert type(err) is ex.InvalidName and isinstance(err, TypeError)
    assert rig.broker.queued() == 0 and len(rig.broker.groups) == 0


# -- groups ---------------------------------------------------------------------
def test_group_send_skips_full_members_and_counts(rig):
    rig.hello(A)
    for req, channel in enumerate(("a", "b", "c"), 1):
        rig.handle(A, p.GroupAdd(req, "room", channel, 60))
    assert [r.code for r in rig.wire.replies(A)] == [0, 0, 0]
    rig.send(A, "b", b"filler", capacity=1)
    rig.wire.take(A)
    rig.handle(A, p.GroupSend(9, "room", 60, 1), b"hello")
    assert rig.wire.replies(A) == [p.Reply(9, 0, "", [2, 1])]
    assert [m.body for m in rig.broker.queues["a"].queue] == [b"hello"]
    assert [m.body for m in rig.broker.queues["b"].queue] == [b"filler"]
    assert [m.body for m in rig.broker.queues["c"].queue] == [b"hello"]
    assert rig.broker.counters["refused_full"] == 1


def test_group_send_skips_members_at_the_hard_cap_without_failing():
    """``--max-queue-length`` is a hard cap below any sender's capacity; a
    member at it is skipped like a full one, and group_send still succeeds."""
    rig = Rig(max_queue_length=1)
    rig.hello(A)
    for req, channel in enumerate(("a", "b", "c"), 1):
        rig.handle(A, p.GroupAdd(req, "room", channel, 60))
    rig.send(A, "b", b"filler", capacity=100)
    rig.wire.take(A)
    rig.handle(A, p.GroupSend(9, "room", 60, 100), b"hello")
    assert rig.wire.replies(A) == [p.Reply(9, 0, "", [2, 1])]
    assert [m.body for m in rig.broker.queues["a"].queue] == [b"hello"]
    assert [m.body for m in rig.broker.queues["b"].queue] == [b"filler"]
    assert [m.body for m in rig.broker.queues["c"].queue] == [b"hello"]


def test_a_checked_send_over_the_hard_cap_queues_nothing():
    rig = Rig(max_queue_length=2)
    rig.hello(A)
    rig.handle(A, p.Send(5, "ch", 60, 100, True), b"1", b"2", b"3")
    [reply] = rig.wire.replies(A)
    err = ex.from_wire(reply.code, reply.detail, reply.value)
    assert type(err) is ex.QueueFull and err.capacity == 2
    assert "ch" not in rig.broker.queues or not rig.broker.queues["ch"].queue


def test_group_send_reaches_subscribers(rig):
    rig.hello(A, B)
    rig.handle(A, p.GroupAdd(1, "room", "b.inbox", 60))
    rig.handle(B, p.Subscribe(0, "b.inbox", 4))
    rig.handle(A, p.GroupSend(2, "room", 60, 10), b"hi")
    assert rig.wire.delivered(B) == [b"hi"]


def test_group_membership_expires_and_can_be_discarded(rig):
    rig.hello(A)
    rig.handle(A, p.GroupAdd(1, "room", "a", 5))
    rig.handle(A, p.GroupAdd(2, "room", "b", 50))
    rig.handle(A, p.GroupDiscard(3, "room", "b"))
    rig.wire.take(A)
    rig.now += 5
    rig.handle(A, p.GroupSend(4, "room", 60, 10), b"x")
    assert rig.wire.replies(A) == [p.Reply(4, 0, "", [0, 0])]
    assert rig.broker.queued() == 0


def test_group_send_needs_exactly_one_body(rig):
    rig.hello(A)
    rig.handle(A, p.GroupAdd(1, "room", "a", 60))
    rig.wire.take(A)
    rig.handle(A, p.GroupSend(2, "room", 60, 10), b"x", b"y")
    assert type(rig.error(A)) is ex.ProtocolError
    assert rig.broker.queued() == 0


# -- time: sweeps ---------------------------------------------------------------
def test_silent_client_is_dropped_by_sweep(rig):
    rig.hello(A)
    rig.hello(B, heartbeat=0.5)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    limit = 0.5 * rig.broker.missed_heartbeats + 1.0  # silence allowed
    rig.broker.sweep(rig.now + limit)
    assert B in rig.broker.clients
    rig.handle(A, p.Heartbeat(1))  # A keeps talking
    rig.now += limit + 0.01
    rig.broker.sweep(rig.now)
    assert B not in rig.broker.clients and A in rig.broker.clients
    rig.send(A, "ch", b"after")
    assert rig.wire.delivered(B) == []  # its endpoint went with it
    assert rig.broker.queued() == 1


def test_sweep_expires_messages_and_forgets_empty_queues(rig):
    rig.hello(A)
    rig.send(A, "short", b"x", ttl=1)
    rig.send(A, "long", b"y", ttl=100)
    rig.now += 2
    rig.broker.sweep(rig.now)
    assert "short" not in rig.broker.queues and "long" in rig.broker.queues
    assert rig.broker.counters["expired"] == 1
    assert rig.broker.queued() == 1


def test_an_expired_message_is_not_delivered(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"x", ttl=1)
    rig.now += 1
    rig.handle(B, p.Subscribe(0, "ch", 5))
    assert rig.wire.delivered(B) == []


# -- flush, return, bye, hello again --------------------------------------------
def test_flush_drops_messages_and_groups_but_keeps_endpoints(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "sub", 5))
    rig.send(A, "other", b"1")
    rig.handle(A, p.GroupAdd(2, "room", "other", 60))
    rig.wire.take(A)
    rig.handle(A, p.Flush(3))
    assert rig.wire.replies(A) == [p.Reply(3, 0, "", None)]
    assert rig.broker.queued() == 0 and len(rig.broker.groups) == 0
    rig.send(A, "sub", b"after")
    assert rig.wire.delivered(B) == [b"after"]


def test_return_puts_messages_back_at_the_head(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"3")
    rig.send(A, "ch", b"4")
    rig.handle(B, p.Return("ch", [30.0, 30.0]), b"1", b"2")  # oldest first
    assert rig.wire.take(B) == []  # no answer
    rig.handle(B, p.Subscribe(0, "ch", 10))
    [(msg, bodies)] = rig.wire.take(B)
    assert bodies == [b"1", b"2", b"3", b"4"]
    assert list(msg.ttls)[:2] == [pytest.approx(30), pytest.approx(30)]


def test_return_drops_what_has_no_time_left(rig):
    rig.hello(B)
    rig.handle(B, p.Return("ch", [0.0, 5.0, -1.0]), b"a", b"b", b"c")
    rig.handle(B, p.Subscribe(0, "ch", 10))
    assert rig.wire.delivered(B) == [b"b"]


def test_return_needs_a_body_per_ttl(rig):
    rig.hello(B)
    rig.handle(B, p.Return("ch", [5.0, 5.0]), b"only-one")
    assert type(rig.error(B)) is ex.ProtocolError
    assert rig.broker.queued() == 0


def test_bye_drops_the_client_and_its_endpoints(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.handle(B, p.Bye())
    assert B not in rig.broker.clients
    rig.send(A, "ch", b"x")
    assert rig.wire.delivered(B) == []
    assert rig.broker.queued() == 1


def test_hello_again_drops_old_endpoints(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.hello(B)  # reconnected: it replays what it wants
    rig.send(A, "ch", b"x")
    assert rig.wire.delivered(B) == []
    rig.handle(B, p.Subscribe(0, "ch", 1))
    assert rig.wire.delivered(B) == [b"x"]


def test_stats_and_idle(rig):
    assert rig.broker.is_idle()
    rig.hello(A)
    assert not rig.broker.is_idle()
    rig.send(A, "ch", b"x")
    rig.wire.take(A)
    rig.handle(A, p.Stats(2))
    [reply] = rig.wire.replies(A)
    stats = reply.value
    assert stats["instance"] == rig.broker.instance
    assert stats["clients"] == 1 and stats["queued"] == 1 and stats["queues"] == 1
    assert stats["received"] == 3
    rig.handle(A, p.Bye())
    assert not rig.broker.is_idle()  # a message is still queued
    rig.broker.flush()
    assert rig.broker.is_idle()


# -- busy and gone peers --------------------------------------------------------
def test_busy_peer_is_retried(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.wire.busy.add(B)
    rig.send(A, "ch", b"1")
    rig.send(A, "ch", b"2")
    assert rig.broker.stalled and rig.broker.queued() == 2
    rig.retry_stalled()  # still busy
    assert rig.broker.queued() == 2
    rig.wire.busy.clear()
    rig.retry_stalled()
    assert rig.wire.delivered(B) == [b"1", b"2"]
    assert not rig.broker.stalled and rig.broker.queued() == 0


def test_gone_peer_loses_its_endpoint_not_the_message(rig):
    rig.hello(A, B, C)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.wire.gone.add(B)
    rig.send(A, "ch", b"1")
    assert rig.broker.queued() == 1
    rig.handle(C, p.Subscribe(0, "ch", 5))
    assert rig.wire.delivered(C) == [b"1"]


def test_a_reply_to_a_gone_peer_does_not_raise(rig):
    rig.wire.gone.add(A)
    rig.handle(A, p.Hello(1, "a", 1.0))
    rig.handle(A, p.Heartbeat(2))
    assert A in rig.broker.clients


# -- hostile input --------------------------------------------------------------
def _protocol_error_to(rig: Rig, ident: bytes) -> ex.BrokerError:
    err = rig.error(ident)
    assert type(err) is ex.ProtocolError
    return err


def test_a_lone_routing_frame_gets_an_error(rig):
    rig.broker.handle([A], rig.now)
    _protocol_error_to(rig, A)


def test_no_frames_at_all_is_ignored(rig):
    rig.broker.handle([], rig.now)
    assert rig.wire.out == []


@pytest.mark.parametrize(
    "frames",
    [
        [p.encode(p.Heartbeat(1)), b"x", b"y"],  # 4 frames: bodies on a bodiless command
        [p.encode(p.Hello(1, "a", 1.0)), b"x"],
        [p.encode(p.Send(1, "ch", 60, 10))],  # a Send needs a body
        [b"garbage"],
        [V + b"garbage"],
        [V + b"\x93\x63\x01\x02"],  # unknown tag 99
        [bytes([p.VERSION + 1]) + p.encode(p.Heartbeat(1))[1:]],  # wrong version
        [b""],
        [V],
        [V + b"\x93\x0a\x01" + b"\x91" * 100_000],  # nested past the recursion limit
        [p.encode(p.Send(1, "ch", 60, 10)), *([b"x"] * (p.MAX_BATCH + 1))],
    ],
    ids=[
        "4-frames",
        "body-on-hello",
        "send-without-body",
        "garbage",
        "garbage-after-version",
        "unknown-tag",
        "wrong-version",
        "empty-header",
        "version-only",
        "deep-nesting",
        "too-many-bodies",
    ],
)
def test_bad_frames_get_an_error_reply_and_never_raise(rig, frames):
    rig.hello(A)
    rig.broker.handle([A, *frames], rig.now)
    err = _protocol_error_to(rig, A)
    assert str(err)
    assert rig.broker.queued() == 0
    # ...and the broker goes on serving.
    rig.handle(A, p.Heartbeat(42))
    assert rig.wire.replies(A) == [p.Reply(42, 0, "", rig.broker.instance)]


def test_a_bug_in_a_handler_becomes_an_error_reply(rig, monkeypatch):
    rig.hello(A)

    def boom(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(rig.broker, "flush", boom)
    rig.handle(A, p.Flush(5))
    [reply] = rig.wire.replies(A)
    assert reply.req == 5 and reply.code == ex.BrokerError.code and "boom" in reply.detail
    rig.handle(A, p.Heartbeat(6))
    assert rig.wire.replies(A) == [p.Reply(6, 0, "", rig.broker.instance)]


# -- the outgoing buffer (data_to_send / send_failed) ---------------------------
def _batch(rig: Rig, *messages: tuple) -> list:
    """Handle several messages as one read batch; return what is to be sent."""
    for ident, cmd, *bodies in messages:
        rig.broker.handle([ident, p.encode(cmd), *bodies], rig.now)
    return rig.broker.data_to_send()


def test_one_deliver_per_peer_per_batch_across_channels(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "x", 10))
    rig.handle(B, p.Subscribe(0, "y", 10))
    [[out]] = _batch(
        rig,
        (A, p.Send(1, "x", 60, 100, False), b"x1"),
        (A, p.Send(2, "y", 60, 100, False), b"y1"),
        (A, p.Send(3, "x", 60, 100, False), b"x2"),
    )
    assert out.ident == B
    msg = p.decode_to_client(out.frames[0])
    assert isinstance(msg, p.Deliver) and list(msg.channels) == ["x", "y", "x"]
    assert out.frames[1:] == [b"x1", b"y1", b"x2"]
    assert rig.broker.data_to_send() == []  # handed over: the buffer is empty


def test_a_deliver_carries_at_most_max_batch_bodies(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "x", p.MAX_BATCH + 10))
    bodies = [b"%d" % i for i in range(p.MAX_BATCH + 10)]
    peers = _batch(
        rig,
        (A, p.Send(1, "x", 60, 10_000, False), *bodies[: p.MAX_BATCH]),
        (A, p.Send(2, "x", 60, 10_000, False), *bodies[p.MAX_BATCH :]),
    )
    [messages] = peers
    assert [len(out.frames) - 1 for out in messages] == [p.MAX_BATCH, 10]
    assert [b for out in messages for b in out.frames[1:]] == bodies


def test_replies_and_deliveries_keep_their_decided_order(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "x", 10))
    [messages] = [m for m in _batch(rig, (A, p.Send(1, "x", 60, 100, False), b"1"), (B, p.Heartbeat(7))) if m]
    kinds = [type(p.decode_to_client(out.frames[0])).__name__ for out in messages]
    assert kinds == ["Deliver", "Reply"]


def test_a_failed_batch_goes_back_exactly(rig):
    """A busy peer: its Deliver and everything after it come back; the runs
    are at the head of their queues with their credit, held and memory as
    before the send; the reply is dropped."""
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "x", 3))
    rig.send(A, "x", b"0")
    assert rig.wire.delivered(B) == [b"0"]
    queue, endpoint = rig.broker.queues["x"], rig.broker.clients[B].endpoints["x"]
    memory, delivered = rig.broker.memory.used, rig.broker.counters["delivered"]
    peers = _batch(rig, (A, p.Send(1, "x", 60, 100, False), b"1", b"2"), (B, p.Heartbeat(7)))
    [messages] = [m for m in peers if m[0].ident == B]
    assert endpoint.held == 3 and endpoint.credit == 0
    rig.broker.send_failed(messages, BUSY)
    assert [m.body for m in queue.queue] == [b"1", b"2"]
    assert endpoint.held == 1 and queue.held == 1 and endpoint.credit == 2
    assert rig.broker.memory.used == memory + 2 * (queue.queue[0].size)
    assert rig.broker.counters["delivered"] == delivered
    assert queue in rig.broker.stalled
    rig.retry_stalled()
    assert rig.wire.take(B) and rig.broker.queued() == 0 and endpoint.held == 3


def test_a_gone_peer_loses_its_endpoint_and_keeps_the_messages(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "x", 3))
    [messages] = [m for m in _batch(rig, (A, p.Send(1, "x", 60, 100, False), b"1")) if m[0].ident == B]
    rig.broker.send_failed(messages, GONE)
    queue = rig.broker.queues["x"]
    assert [m.body for m in queue.queue] == [b"1"] and not queue.subscribers and queue.held == 0


def test_replies_can_go_before_the_batch_ends(rig):
    """The shell takes the peers that got a reply after each message (their
    whole list, in order); deliveries to the others wait for the batch."""
    rig.hello(A, B, C)
    rig.handle(B, p.Subscribe(0, "x", 10))
    rig.handle(C, p.Subscribe(0, "y", 10))
    rig.broker.handle([A, p.encode(p.Send(1, "x", 60, 100, False)), b"1"], rig.now)
    rig.broker.handle([B, p.encode(p.Heartbeat(5))], rig.now)
    rig.broker.handle([A, p.encode(p.Send(2, "y", 60, 100, False)), b"2"], rig.now)
    [messages] = rig.broker.data_to_send(replies_only=True)
    assert [type(p.decode_to_client(out.frames[0])).__name__ for out in messages] == ["Deliver", "Reply"]
    assert messages[0].ident == B
    assert rig.broker.data_to_send(replies_only=True) == []
    [[rest]] = rig.broker.data_to_send()
    assert rest.ident == C and rest.frames[1:] == [b"2"]


# -- a group_send's members delivered at once (outbox.GroupRun) -------------------
def _members(rig: Rig, ident: bytes, count: int, credit: int = 4, shared: bool = True) -> list[str]:
    """``count`` members of group "room", each subscribed by ``ident``."""
    rig.handle(ident, p.Hello(1, ident.decode(), 1.0, shared))
    rig.wire.take(ident)
    channels = [f"m!{ident.decode()}.{i}" for i in range(count)]
    for channel in channels:
        rig.handle(A, p.GroupAdd(1, "room", channel, 60))
        rig.handle(ident, p.Subscribe(0, channel, credit))
    rig.wire.take(A)
    return channels


def _deliveries(messages: list) -> list[tuple[str, bytes]]:
    """(channel, body) of every message the Delivers in ``messages`` carry."""
    got = []
    for out in messages:
        msg = p.decode_to_client(out.frames[0])
        assert isinstance(msg, p.Deliver)
        bodies = out.frames[1:]
        if msg.body_of:
            bodies = [bodies[i] for i in msg.body_of]
        got += list(zip(msg.channels or [msg.channel] * len(bodies), bodies, strict=True))
    return got


def _received(rig: Rig, ident: bytes) -> list[tuple[str, bytes]]:
    """(channel, body) of every message delivered to ``ident`` since the last take."""
    got = []
    for msg, bodies in rig.wire.take(ident):
        if isinstance(msg, p.Deliver):
            if msg.body_of:
                bodies = [bodies[i] for i in msg.body_of]
            got += list(zip(msg.channels or [msg.channel] * len(bodies), bodies, strict=True))
    return got


def test_a_group_send_delivers_at_once_without_queue_entries_and_counts_per_member(rig):
    """Members with an empty queue and credit get the message at once: no
    queue entry and no memory counted; each member's credit, held count and
    counters move as one delivery to it (capacity stays per member)."""
    rig.hello(A)
    channels = _members(rig, B, 3)
    [messages] = [m for m in _batch(rig, (A, p.GroupSend(9, "room", 60, 100, []), b"hi")) if m[0].ident == B]
    assert _deliveries(messages) == [(c, b"hi") for c in channels]
    assert len(messages) == 1 and len(messages[0].frames) == 2  # one Deliver, the body once
    assert rig.broker.memory.used == 0 and rig.broker.queued() == 0
    for channel in channels:
        queue, endpoint = rig.broker.queues[channel], rig.broker.clients[B].endpoints[channel]
        assert endpoint.credit == 3 and endpoint.held == 1 and queue.held == 1
        assert queue.delivered == 1 and queue.enqueued == 1
    assert rig.broker.counters["delivered"] == 3


def test_group_members_behind_share_one_message_and_wait_in_order_for_credit(rig):
    """Members without credit (their receivers are behind) queue the
    message, one object for all of them; a member with a backlog gets no
    delivery attempt (none can succeed), and its next credit brings its
    backlog in order."""
    rig.hello(A)
    channels = _members(rig, B, 2, credit=1)
    for body in (b"one", b"two", b"three"):
        rig.handle(A, p.GroupSend(9, "room", 60, 100, []), body)
    assert _received(rig, B) == [(c, b"one") for c in channels]  # the credit of one each
    queues = [rig.broker.queues[c] for c in channels]
    assert [[m.body for m in q.queue] for q in queues] == [[b"two", b"three"]] * 2
    assert queues[0].queue[0] is queues[1].queue[0] and queues[0].queue[1] is queues[1].queue[1]
    assert rig.broker.memory.used == 2 * sum(m.size for m in queues[0].queue)  # counted per member
    rig.handle(B, p.Subscribe(0, channels[1], 4))
    assert _received(rig, B) == [(channels[1], b"two"), (channels[1], b"three")]
    rig.handle(A, p.GroupSend(9, "room", 60, 100, []), b"four")  # channels[1] has credit and no backlog
    assert _received(rig, B) == [(channels[1], b"four")]
    assert [m.body for m in queues[0].queue] == [b"two", b"three", b"four"]


def test_the_outbox_counts_deliveries_until_they_are_taken(rig):
    """``Outbox.deliveries``: what the shell reads to send a big fan-out
    before its read batch ends (server._FLUSH_AT). Group members and queued
    runs count; replies do not; a full take starts again from zero."""
    rig.hello(A)
    _members(rig, B, 3)
    rig.broker.data_to_send()
    outbox = rig.broker.outbox
    assert outbox.deliveries == 0
    handle = rig.broker.handle
    handle([A, p.encode(p.GroupSend(9, "room", 60, 100, [])), b"hi"], rig.now)  # 3 members at once, and a reply
    assert outbox.deliveries == 3
    handle([B, p.encode(p.Subscribe(0, "other", 4))], rig.now)
    handle([A, p.encode(p.Send(0, "other", 60, 100, False)), b"x", b"y"], rig.now)  # one run of two
    assert outbox.deliveries == 5
    rig.broker.data_to_send()
    assert outbox.deliveries == 0


def test_a_group_send_to_more_members_than_a_deliver_holds_is_split(rig):
    rig.hello(A)
    channels = _members(rig, B, p.MAX_BATCH + 5)
    [messages] = [m for m in _batch(rig, (A, p.GroupSend(9, "room", 60, 100, []), b"hi")) if m[0].ident == B]
    assert [len(p.decode_to_client(out.frames[0]).channels) for out in messages] == [p.MAX_BATCH, 5]
    assert _deliveries(messages) == [(c, b"hi") for c in channels]


def test_a_group_send_to_an_old_peer_repeats_the_body(rig):
    """A client without shared bodies gets one body frame per member."""
    rig.hello(A)
    channels = _members(rig, B, 2, shared=False)
    [messages] = [m for m in _batch(rig, (A, p.GroupSend(9, "room", 60, 100, []), b"hi")) if m[0].ident == B]
    [out] = messages
    assert out.frames[1:] == [b"hi", b"hi"] and not p.decode_to_client(out.frames[0]).body_of
    assert _deliveries(messages) == [(c, b"hi") for c in channels]


def test_a_group_member_with_a_backlog_or_no_credit_gets_it_in_order(rig):
    """A member whose queue holds messages gets the group's message after
    them (FIFO per channel); one without credit gets it queued."""
    rig.hello(A)
    first, second, third = _members(rig, B, 3, credit=1)
    rig.handle(B, p.Unsubscribe(5, second))
    rig.wire.take(B)
    rig.send(A, second, b"old")
    rig.wire.take(A)
    rig.handle(B, p.Subscribe(0, third, 1))
    rig.send(A, third, b"earlier")
    rig.wire.take(A)
    assert rig.wire.delivered(B) == [b"earlier"]  # third's credit: 1 of 2 left
    rig.handle(A, p.GroupSend(9, "room", 60, 100, []), b"hi")
    assert rig.wire.replies(A) == [p.Reply(9, 0, "", [3, 0])]
    assert _received(rig, B) == [(first, b"hi"), (third, b"hi")]
    assert [m.body for m in rig.broker.queues[second].queue] == [b"old", b"hi"]
    rig.handle(B, p.Subscribe(0, second, 2))
    assert _received(rig, B) == [(second, b"old"), (second, b"hi")]


def test_a_group_member_at_capacity_is_skipped_and_held_messages_count(rig):
    """Capacity per member counts what its receivers hold: a member holding
    one message at capacity 1 is skipped; a later checked send sees it."""
    rig.hello(A)
    full, free = _members(rig, B, 2)
    rig.handle(B, p.Unsubscribe(5, free))
    rig.handle(A, p.GroupSend(8, "room", 60, 1, []), b"one")
    rig.wire.take(A)
    rig.wire.take(B)
    rig.handle(A, p.GroupSend(9, "room", 60, 1, []), b"two")
    assert rig.wire.replies(A) == [p.Reply(9, 0, "", [0, 2])]
    rig.send(A, full, b"x", capacity=1)
    assert type(rig.error(A)) is ex.QueueFull
    rig.handle(B, p.Consumed(rig.broker.epoch, [full], [1]))
    rig.handle(A, p.GroupSend(10, "room", 60, 1, []), b"three")
    assert rig.wire.replies(A) == [p.Reply(10, 0, "", [1, 1])]
    assert rig.wire.delivered(B) == [b"three"]


def test_a_busy_peer_gets_a_group_run_back_in_each_members_queue(rig):
    rig.hello(A)
    channels = _members(rig, B, 3, credit=1)
    rig.send(A, channels[1], b"before")
    rig.wire.take(A)
    rig.wire.take(B)
    rig.handle(B, p.Subscribe(0, channels[1], 1))  # credit again; "before" is held
    peers = _batch(rig, (A, p.GroupSend(9, "room", 60, 100, []), b"hi"), (B, p.Heartbeat(7)))
    [messages] = [m for m in peers if m[0].ident == B]
    rig.broker.send_failed(messages, BUSY)
    assert rig.broker.counters["delivered"] == 1  # only "before"
    for channel in channels:
        queue, endpoint = rig.broker.queues[channel], rig.broker.clients[B].endpoints[channel]
        assert [m.body for m in queue.queue] == [b"hi"] and endpoint.credit == 1
        assert endpoint.held == queue.held == (channel == channels[1])
        assert queue in rig.broker.stalled
    assert rig.broker.memory.used == 3 * rig.broker.queues[channels[0]].queue[0].size
    rig.now += 1.0
    rig.retry_stalled()
    got = rig.wire.take(B)
    assert all(msg.ttls == [59.0] * len(msg.ttls) for msg, _ in got)  # the deadline kept
    delivered = [c for msg, bodies in got for c in (msg.channels or [msg.channel] * len(bodies))]
    assert sorted(delivered) == sorted(channels)
    assert rig.broker.queued() == 0 and rig.broker.memory.used == 0


def test_a_gone_peer_gets_a_group_run_back_and_loses_its_endpoints(rig):
    rig.hello(A)
    channels = _members(rig, B, 2)
    [messages] = [m for m in _batch(rig, (A, p.GroupSend(9, "room", 60, 100, []), b"hi")) if m[0].ident == B]
    rig.broker.send_failed(messages, GONE)
    for channel in channels:
        queue = rig.broker.queues[channel]
        assert [m.body for m in queue.queue] == [b"hi"] and not queue.subscribers and queue.held == 0
