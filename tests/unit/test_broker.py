"""``server.broker.Broker``, the routing core, driven directly: a fake ROUTER
socket and time passed in as ``now``. No zmq I/O, no asyncio."""

from __future__ import annotations

from typing import Any

import pytest

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.server.broker import Broker
from helpers import FakeRouter

A, B, C = b"client-a", b"client-b", b"client-c"
V = bytes([p.VERSION])


class Rig:
    def __init__(self, **options: Any) -> None:
        self.now = 100.0
        self.sock = FakeRouter()
        self.broker = Broker(self.sock, clock=lambda: self.now, **options)

    def handle(self, ident: bytes, cmd: Any, *bodies: bytes) -> None:
        self.broker.handle([ident, p.encode(cmd), *bodies], self.now)

    def hello(self, *idents: bytes, heartbeat: float = 1.0) -> None:
        for ident in idents:
            self.handle(ident, p.Hello(1, ident.decode(), heartbeat))
            [reply] = self.sock.replies(ident)
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
        [reply] = self.sock.replies(ident)
        assert reply.code != 0, reply
        return ex.from_wire(reply.code, reply.detail, reply.value)


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- connection -----------------------------------------------------------------
def test_hello_is_answered_with_instance_max_body_and_flush_epoch(rig):
    rig.handle(A, p.Hello(7, "client-a", 1.0))
    [(reply, bodies)] = rig.sock.take(A)
    assert reply == p.Reply(7, 0, "", [rig.broker.instance, rig.broker.max_body, rig.broker.epoch])
    assert bodies == []
    assert A in rig.broker.clients and rig.broker.clients[A].client_id == "client-a"


def test_unknown_peer_is_welcomed_before_its_answer(rig):
    rig.handle(A, p.Heartbeat(3))
    msgs = [m for m, _ in rig.sock.take(A)]
    assert msgs == [p.Welcome(rig.broker.instance, rig.broker.max_body), p.Reply(3, 0, "", rig.broker.instance)]
    rig.handle(A, p.Heartbeat(4))  # known now: no second Welcome
    assert [m for m, _ in rig.sock.take(A)] == [p.Reply(4, 0, "", rig.broker.instance)]


def test_two_brokers_have_different_instances():
    assert Rig().broker.instance != Rig().broker.instance


# -- send, subscribe, deliver ---------------------------------------------------
def test_send_then_subscribe_delivers(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"one", req=5)
    assert rig.sock.replies(A) == [p.Reply(5, 0, "", 1)]  # checked: the depth comes back
    rig.handle(B, p.Subscribe(0, "ch", 5))
    [(msg, bodies)] = rig.sock.take(B)
    assert isinstance(msg, p.Deliver) and msg.channel == "ch"
    assert bodies == [b"one"]
    assert list(msg.ttls) == [pytest.approx(60)]
    assert rig.sock.take(B) == [] and rig.broker.queued() == 0


def test_subscribe_then_send_delivers_at_once(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    assert rig.sock.take(B) == []  # Subscribe has no answer
    rig.send(A, "ch", b"x", req=2)
    assert rig.sock.delivered(B) == [b"x"]
    # The depth counts the message B holds and has not reported consumed.
    assert rig.sock.replies(A) == [p.Reply(2, 0, "", 1)]


def test_ttl_left_travels_with_the_delivery(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"x", ttl=10)
    rig.now += 4
    rig.handle(B, p.Subscribe(0, "ch", 1))
    [(msg, _)] = rig.sock.take(B)
    assert list(msg.ttls) == [pytest.approx(6)]


def test_credit_limits_deliveries_and_fifo(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 2))
    for i in range(5):
        rig.send(A, "ch", b"%d" % i)
    assert rig.sock.delivered(B) == [b"0", b"1"]
    assert rig.broker.queued() == 3
    rig.handle(B, p.Subscribe(0, "ch", 10))
    assert rig.sock.delivered(B) == [b"2", b"3", b"4"]


def test_two_consumers_each_message_once(rig):
    rig.hello(A, B, C)
    rig.handle(B, p.Subscribe(0, "ch", 100))
    rig.handle(C, p.Subscribe(0, "ch", 100))
    for i in range(10):
        rig.send(A, "ch", b"%d" % i)
    got_b, got_c = rig.sock.delivered(B), rig.sock.delivered(C)
    assert sorted(got_b + got_c, key=int) == [b"%d" % i for i in range(10)]
    assert got_b == sorted(got_b, key=int) and got_c == sorted(got_c, key=int)
    assert got_b and got_c  # round robin: both got some


def test_multi_body_send_is_queued_in_order(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"1", b"2", b"3", req=9)
    assert rig.sock.replies(A) == [p.Reply(9, 0, "", 3)]
    rig.handle(B, p.Subscribe(0, "ch", 10))
    assert rig.sock.delivered(B) == [b"1", b"2", b"3"]


def test_unsubscribe_returns_unused_credit_and_stops_deliveries(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.send(A, "ch", b"1")
    rig.sock.take(B)
    rig.handle(B, p.Unsubscribe(4, "ch"))
    assert rig.sock.replies(B) == [p.Reply(4, 0, "", 4)]
    rig.send(A, "ch", b"2")
    assert rig.sock.take(B) == []
    assert rig.broker.queued() == 1
    rig.handle(B, p.Unsubscribe(5, "ch"))  # not subscribed: fine, nothing left
    assert rig.sock.replies(B) == [p.Reply(5, 0, "", 0)]


def test_process_channel_takes_one_client(rig):
    rig.hello(B, C)
    rig.handle(B, p.Subscribe(0, "proc.b!", 5))
    rig.handle(C, p.Subscribe(6, "proc.b!", 5))
    err = rig.error(C)
    assert type(err) is ex.SubscriptionError
    rig.handle(B, p.Subscribe(0, "proc.b!", 5))  # the owner may grant more
    assert rig.sock.take(B) == []


# -- limits ---------------------------------------------------------------------
def test_checked_send_refused_at_capacity(rig):
    rig.hello(A)
    for i in range(3):
        rig.send(A, "ch", b"x", req=i + 1, capacity=3)
        assert rig.sock.replies(A) == [p.Reply(i + 1, 0, "", i + 1)]
    rig.send(A, "ch", b"x", req=4, capacity=3)
    [reply] = rig.sock.replies(A)
    assert reply.req == 4
    err = ex.from_wire(reply.code, reply.detail, reply.value)
    assert type(err) is ex.QueueFull and err.channel == "ch" and err.capacity == 3
    assert rig.broker.queued() == 3
    assert rig.broker.counters["refused_full"] == 1


def test_checked_multi_body_send_is_all_or_nothing(rig):
    rig.hello(A)
    rig.send(A, "ch", b"1", capacity=3)
    rig.sock.take(A)
    rig.send(A, "ch", b"2", b"3", b"4", capacity=3)
    assert type(rig.error(A)) is ex.QueueFull
    assert rig.broker.queued() == 1


def test_expired_messages_make_room(rig):
    rig.hello(A)
    rig.send(A, "ch", b"old", ttl=1, capacity=1)
    rig.now += 1
    rig.send(A, "ch", b"new", req=2, capacity=1)
    assert rig.sock.replies(A)[-1] == p.Reply(2, 0, "", 1)


def test_unchecked_send_is_silent_until_twice_the_capacity(rig):
    rig.hello(A)
    for _ in range(4):
        rig.send(A, "ch", b"x", capacity=2, checked=False)
    assert rig.sock.take(A) == []  # pipelined: no answers
    rig.send(A, "ch", b"x", req=0, capacity=2, checked=False)
    err = rig.error(A)
    assert type(err) is ex.QueueFull and err.capacity == 2
    assert rig.broker.queued() == 4


def test_message_too_large():
    rig = Rig(max_body=10)
    rig.hello(A)
    rig.send(A, "ch", b"x" * 10, req=1)
    assert rig.sock.replies(A) == [p.Reply(1, 0, "", 1)]
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
    replies = rig.sock.replies(A)
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
    assert [r.code for r in rig.sock.replies(A)] == [0, 0, 0]
    rig.send(A, "b", b"filler", capacity=1)
    rig.sock.take(A)
    rig.handle(A, p.GroupSend(9, "room", 60, 1), b"hello")
    assert rig.sock.replies(A) == [p.Reply(9, 0, "", [2, 1])]
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
    rig.sock.take(A)
    rig.handle(A, p.GroupSend(9, "room", 60, 100), b"hello")
    assert rig.sock.replies(A) == [p.Reply(9, 0, "", [2, 1])]
    assert [m.body for m in rig.broker.queues["a"].queue] == [b"hello"]
    assert [m.body for m in rig.broker.queues["b"].queue] == [b"filler"]
    assert [m.body for m in rig.broker.queues["c"].queue] == [b"hello"]


def test_a_checked_send_over_the_hard_cap_queues_nothing():
    rig = Rig(max_queue_length=2)
    rig.hello(A)
    rig.handle(A, p.Send(5, "ch", 60, 100, True), b"1", b"2", b"3")
    [reply] = rig.sock.replies(A)
    err = ex.from_wire(reply.code, reply.detail, reply.value)
    assert type(err) is ex.QueueFull and err.capacity == 2
    assert "ch" not in rig.broker.queues or not rig.broker.queues["ch"].queue


def test_group_send_reaches_subscribers(rig):
    rig.hello(A, B)
    rig.handle(A, p.GroupAdd(1, "room", "b.inbox", 60))
    rig.handle(B, p.Subscribe(0, "b.inbox", 4))
    rig.handle(A, p.GroupSend(2, "room", 60, 10), b"hi")
    assert rig.sock.delivered(B) == [b"hi"]


def test_group_membership_expires_and_can_be_discarded(rig):
    rig.hello(A)
    rig.handle(A, p.GroupAdd(1, "room", "a", 5))
    rig.handle(A, p.GroupAdd(2, "room", "b", 50))
    rig.handle(A, p.GroupDiscard(3, "room", "b"))
    rig.sock.take(A)
    rig.now += 5
    rig.handle(A, p.GroupSend(4, "room", 60, 10), b"x")
    assert rig.sock.replies(A) == [p.Reply(4, 0, "", [0, 0])]
    assert rig.broker.queued() == 0


def test_group_send_needs_exactly_one_body(rig):
    rig.hello(A)
    rig.handle(A, p.GroupAdd(1, "room", "a", 60))
    rig.sock.take(A)
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
    assert rig.sock.delivered(B) == []  # its endpoint went with it
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
    assert rig.sock.delivered(B) == []


# -- flush, return, bye, hello again --------------------------------------------
def test_flush_drops_messages_and_groups_but_keeps_endpoints(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "sub", 5))
    rig.send(A, "other", b"1")
    rig.handle(A, p.GroupAdd(2, "room", "other", 60))
    rig.sock.take(A)
    rig.handle(A, p.Flush(3))
    assert rig.sock.replies(A) == [p.Reply(3, 0, "", None)]
    assert rig.broker.queued() == 0 and len(rig.broker.groups) == 0
    rig.send(A, "sub", b"after")
    assert rig.sock.delivered(B) == [b"after"]


def test_return_puts_messages_back_at_the_head(rig):
    rig.hello(A, B)
    rig.send(A, "ch", b"3")
    rig.send(A, "ch", b"4")
    rig.handle(B, p.Return("ch", [30.0, 30.0]), b"1", b"2")  # oldest first
    assert rig.sock.take(B) == []  # no answer
    rig.handle(B, p.Subscribe(0, "ch", 10))
    [(msg, bodies)] = rig.sock.take(B)
    assert bodies == [b"1", b"2", b"3", b"4"]
    assert list(msg.ttls)[:2] == [pytest.approx(30), pytest.approx(30)]


def test_return_drops_what_has_no_time_left(rig):
    rig.hello(B)
    rig.handle(B, p.Return("ch", [0.0, 5.0, -1.0]), b"a", b"b", b"c")
    rig.handle(B, p.Subscribe(0, "ch", 10))
    assert rig.sock.delivered(B) == [b"b"]


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
    assert rig.sock.delivered(B) == []
    assert rig.broker.queued() == 1


def test_hello_again_drops_old_endpoints(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.hello(B)  # reconnected: it replays what it wants
    rig.send(A, "ch", b"x")
    assert rig.sock.delivered(B) == []
    rig.handle(B, p.Subscribe(0, "ch", 1))
    assert rig.sock.delivered(B) == [b"x"]


def test_stats_and_idle(rig):
    assert rig.broker.is_idle()
    rig.hello(A)
    assert not rig.broker.is_idle()
    rig.send(A, "ch", b"x")
    rig.sock.take(A)
    rig.handle(A, p.Stats(2))
    [reply] = rig.sock.replies(A)
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
    rig.sock.busy.add(B)
    rig.send(A, "ch", b"1")
    rig.send(A, "ch", b"2")
    assert rig.broker.stalled and rig.broker.queued() == 2
    rig.broker.retry_stalled()  # still busy
    assert rig.broker.queued() == 2
    rig.sock.busy.clear()
    rig.broker.retry_stalled()
    assert rig.sock.delivered(B) == [b"1", b"2"]
    assert not rig.broker.stalled and rig.broker.queued() == 0


def test_gone_peer_loses_its_endpoint_not_the_message(rig):
    rig.hello(A, B, C)
    rig.handle(B, p.Subscribe(0, "ch", 5))
    rig.sock.gone.add(B)
    rig.send(A, "ch", b"1")
    assert rig.broker.queued() == 1
    rig.handle(C, p.Subscribe(0, "ch", 5))
    assert rig.sock.delivered(C) == [b"1"]


def test_a_reply_to_a_gone_peer_does_not_raise(rig):
    rig.sock.gone.add(A)
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
    assert rig.sock.out == []


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
    assert rig.sock.replies(A) == [p.Reply(42, 0, "", rig.broker.instance)]


def test_a_bug_in_a_handler_becomes_an_error_reply(rig, monkeypatch):
    rig.hello(A)

    def boom(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(rig.broker, "flush", boom)
    rig.handle(A, p.Flush(5))
    [reply] = rig.sock.replies(A)
    assert reply.req == 5 and reply.code == ex.BrokerError.code and "boom" in reply.detail
    rig.handle(A, p.Heartbeat(6))
    assert rig.sock.replies(A) == [p.Reply(6, 0, "", rig.broker.instance)]
