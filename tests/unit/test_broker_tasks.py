"""Task queues through ``server.broker.Broker``: commands in through
``handle``, what it decided out through ``data_to_send`` (decoded with
``protocol.decode_to_client``), failed sends reported with ``send_failed``.
No zmq, no asyncio, time passed in."""

from __future__ import annotations

from typing import Any

import pytest

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.server.broker import BUSY, GONE, Broker
from django_message_broker.server.outbox import Outgoing
from helpers import Wire

A, B, C = b"worker-a", b"worker-b", b"producer"


class Rig:
    def __init__(self, **options: Any) -> None:
        self.now = 100.0
        self.broker = Broker(clock=lambda: self.now, **options)
        self.wire = Wire(self.broker)
        self.req = 0

    def handle(self, ident: bytes, cmd: Any, *bodies: bytes, pump: bool = True) -> None:
        self.broker.handle([ident, p.encode(cmd), *bodies], self.now)
        if pump:
            self.wire.pump()

    def request(self, ident: bytes, cmd: Any, *bodies: bytes) -> p.Reply:
        """A task command that is answered: its one reply."""
        self.req += 1
        cmd.req = self.req
        self.handle(ident, cmd, *bodies)
        sent = self.take(ident)
        [reply] = [m for m, _ in sent if isinstance(m, p.Reply)]
        assert reply.req == self.req
        # What else it was sent (deliveries decided with the reply) stays to be taken.
        self.wire.out.extend((ident, m, b) for m, b in sent if m is not reply)
        return reply

    def ok(self, ident: bytes, cmd: Any, *bodies: bytes) -> Any:
        reply = self.request(ident, cmd, *bodies)
        assert reply.code == 0, reply
        return reply.value

    def error(self, ident: bytes, cmd: Any, *bodies: bytes) -> ex.BrokerError:
        reply = self.request(ident, cmd, *bodies)
        assert reply.code != 0, reply
        return ex.from_wire(reply.code, reply.detail, reply.value)

    def take(self, ident: bytes) -> list[tuple[Any, list[bytes]]]:
        """What ``ident`` was sent since the last take (the Welcome left out)."""
        return [(m, b) for m, b in self.wire.take(ident) if not isinstance(m, p.Welcome)]

    def deliveries(self, ident: bytes) -> list[tuple[int, str, int, bool, bytes]]:
        """(session, consumer, tag, redelivered, body) of each TaskDeliver body, in order."""
        out = []
        for msg, bodies in self.take(ident):
            assert isinstance(msg, p.TaskDeliver), msg
            assert len(msg.sessions) == len(msg.consumers) == len(msg.tags) == len(msg.redelivered) == len(bodies)
            out.extend(zip(msg.sessions, msg.consumers, msg.tags, msg.redelivered, bodies, strict=True))
        return out

    def open(self, *idents: bytes, vhost: str = "/") -> None:
        """As the kombu transport connects: Hello without heartbeats, then Open."""
        for ident in idents:
            self.ok(ident, p.Hello(0, ident.decode(), 0.0))
            self.ok(ident, p.Open(0, vhost))

    def publish(self, key: str, *bodies: bytes, exchange: str = "", priority: int = 0, ident: bytes = C) -> None:
        for body in bodies:
            self.handle(ident, p.Publish(0, exchange, key, priority), body)

    def worker(self, ident: bytes, queue: str = "q", prefetch: int = 0, session: int = 1, tag: str = "c") -> None:
        self.ok(ident, p.QueueDeclare(0, queue))
        if prefetch:
            self.ok(ident, p.Qos(0, session, prefetch))
        self.ok(ident, p.Consume(0, session, queue, tag))

    def ready(self, name: str = "q") -> list[bytes]:
        queue = self.broker.tasks.vhosts["/"].queues[name]
        return [bytes(m.body) for level in reversed(queue.levels) for m in level]


@pytest.fixture
def rig() -> Rig:
    r = Rig()
    r.open(A, B, C)
    return r


# -- a conversation ---------------------------------------------------------------------
def test_publish_and_consume_produce_task_delivers_with_tags(rig):
    assert rig.ok(A, p.QueueDeclare(0, "q")) == ["q", 0, 0]
    assert rig.ok(A, p.Qos(0, 1, 2)) is None
    assert rig.ok(A, p.Consume(0, 1, "q", "ctag")) is None
    rig.publish("q", b"one", b"two", b"three")
    assert rig.take(C) == []  # an unconfirmed publish is not answered
    assert rig.deliveries(A) == [(1, "ctag", 1, False, b"one"), (1, "ctag", 2, False, b"two")]
    rig.handle(A, p.Ack(1, [1]))
    assert rig.deliveries(A) == [(1, "ctag", 3, False, b"three")]
    rig.handle(A, p.Reject(1, [2, 3], True))
    assert rig.deliveries(A) == [(1, "ctag", 4, True, b"two"), (1, "ctag", 5, True, b"three")]
    rig.handle(A, p.Ack(1, [5], True))
    assert rig.take(A) == []  # Ack and Reject are never answered
    assert rig.broker.stats()["task_unacked"] == 0
    assert rig.broker.memory.used == 0


def test_deliveries_decided_in_one_batch_coalesce_into_one_task_deliver(rig):
    rig.worker(A)
    rig.worker(A, queue="other", session=2, tag="o")
    for body in (b"1", b"2", b"3"):
        rig.handle(C, p.Publish(0, "", "q"), body, pump=False)
    rig.handle(C, p.Publish(0, "", "other"), b"4", pump=False)
    [(msg, bodies)] = rig.take(A)
    assert msg == p.TaskDeliver([1, 1, 1, 2], ["c", "c", "c", "o"], [1, 2, 3, 1], [False] * 4)
    assert bodies == [b"1", b"2", b"3", b"4"]


def test_a_confirmed_publish_is_answered_with_the_number_of_queues(rig):
    rig.ok(A, p.QueueDeclare(0, "q1"))
    rig.ok(A, p.QueueDeclare(0, "q2"))
    rig.ok(A, p.ExchangeDeclare(0, "fx", "fanout"))
    rig.ok(A, p.QueueBind(0, "q1", "fx"))
    rig.ok(A, p.QueueBind(0, "q2", "fx"))
    assert rig.ok(C, p.Publish(0, "fx", "", confirm=True), b"m") == 2
    assert rig.ok(C, p.Publish(0, "", "nowhere", confirm=True), b"m") == 0
    assert rig.broker.stats()["task_unroutable"] == 1
    rig.ok(A, p.QueueUnbind(0, "q2", "fx"))
    assert rig.ok(C, p.Publish(0, "fx", "", confirm=True), b"m") == 1
    assert rig.ok(A, p.QueuePurge(0, "q1")) == 2
    assert rig.ok(A, p.QueueDelete(0, "q2")) == 1
    rig.ok(A, p.ExchangeDelete(0, "fx"))


def test_an_unconfirmed_publish_error_is_answered():
    rig = Rig(max_body=10)
    rig.open(A, C)
    rig.ok(A, p.QueueDeclare(0, "q", arguments={"x-max-length": 1}))
    rig.publish("q", b"fits")
    assert rig.take(C) == []
    err = rig.error(C, p.Publish(0, "", "q"), b"no room")
    assert type(err) is ex.QueueFull and (err.channel, err.capacity) == ("q", 1)
    err = rig.error(C, p.Publish(0, "", "q"), b"x" * 11)
    assert type(err) is ex.MessageTooLarge
    err = rig.error(C, p.Publish(0, "", "q", ttl=-1.0), b"x")
    assert type(err) is ex.ProtocolError
    err = rig.error(C, p.Publish(0, "", "q"))  # no body
    assert type(err) is ex.ProtocolError
    err = rig.error(C, p.Publish(0, "", "q"), b"1", b"2")  # one body only
    assert type(err) is ex.ProtocolError
    assert rig.ready() == [b"fits"]


def test_task_commands_other_than_publish_take_no_body(rig):
    err = rig.error(A, p.QueueDeclare(0, "q"), b"body")
    assert type(err) is ex.ProtocolError
    assert "q" not in rig.broker.tasks.vhosts["/"].queues


def test_errors_come_back_typed_with_their_fields(rig):
    err = rig.error(A, p.QueueDeclare(0, "missing", passive=True))
    assert type(err) is ex.NotFound and (err.kind, err.name) == ("queue", "missing")
    rig.ok(A, p.QueueDeclare(0, "mine", exclusive=True))
    err = rig.error(B, p.Consume(0, 1, "mine", "c"))
    assert type(err) is ex.ResourceLocked and err.name == "mine"
    rig.ok(A, p.ExchangeDeclare(0, "x", "direct"))
    err = rig.error(B, p.ExchangeDeclare(0, "x", "topic"))
    assert type(err) is ex.PreconditionFailed
    assert rig.broker.counters["errors"] == 3


def test_get_replies_with_the_body(rig):
    rig.ok(A, p.QueueDeclare(0, "q"))
    assert rig.ok(A, p.Get(0, 1, "q")) is None  # empty
    rig.publish("q", b"payload")
    rig.req += 1
    rig.handle(A, p.Get(rig.req, 1, "q"))
    [(reply, bodies)] = rig.take(A)
    assert reply == p.Reply(rig.req, 0, "", [1, False])
    assert bodies == [b"payload"]
    rig.handle(A, p.Reject(1, [1], True))
    rig.req += 1
    rig.handle(A, p.Get(rig.req, 1, "q", no_ack=True))
    [(reply, bodies)] = rig.take(A)
    assert reply.value == [2, True] and bodies == [b"payload"]
    assert rig.broker.stats()["task_unacked"] == 0


def test_recover_and_close_session_are_answered_and_give_back(rig):
    rig.worker(A, prefetch=5)
    rig.publish("q", b"1", b"2")
    rig.take(A)
    rig.ok(A, p.Cancel(0, 1, "c"))
    assert rig.ok(A, p.Recover(0, 1)) is None
    assert rig.ready() == [b"1", b"2"]
    rig.ok(A, p.Consume(0, 1, "q", "c"))
    assert [d[2:] for d in rig.deliveries(A)] == [(3, True, b"1"), (4, True, b"2")]
    rig.ok(A, p.CloseSession(0, 1))
    assert rig.ready() == [b"1", b"2"]


def test_commands_before_open_are_a_protocol_error():
    rig = Rig()
    for cmd in (p.QueueDeclare(0, "q"), p.Consume(0, 1, "q", "c"), p.Qos(0, 1, 1), p.Get(0, 1, "q")):
        err = rig.error(A, cmd)
        assert type(err) is ex.ProtocolError and "Open" in str(err)
    err = rig.error(A, p.Publish(0, "", "q", confirm=False), b"x")
    assert type(err) is ex.ProtocolError
    rig.handle(A, p.Ack(1, [1]))  # no req: its error comes back as request 0
    [(reply, _)] = rig.take(A)
    assert isinstance(reply, p.Reply) and reply.req == 0 and reply.code == ex.ProtocolError.code
    assert rig.broker.tasks.clients == {}


def test_a_client_without_heartbeats_asks_the_shell_for_its_socket(rig):
    assert rig.broker.fd_wanted == [A, B, C]  # their Hello said heartbeat 0
    rig.broker.fd_wanted.clear()
    rig.ok(A, p.Open(0, "/"))
    assert rig.broker.fd_wanted == []
    rig.ok(b"layer", p.Hello(0, "layer", 1.0))  # a channel-layer client: its heartbeats tell
    assert rig.broker.fd_wanted == []


def test_open_again_starts_the_connection_afresh(rig):
    rig.worker(A)
    rig.publish("q", b"1")
    rig.take(A)
    rig.ok(A, p.Open(0, "/"))  # a reconnecting connection: what it held goes back
    assert rig.ready() == [b"1"]
    assert rig.broker.tasks.clients[A].sessions == {}


def test_stats_show_the_task_queues(rig):
    rig.worker(A, prefetch=1)
    rig.publish("q", b"1", b"2")
    stats = rig.ok(C, p.Stats(0))
    assert (stats["task_queues"], stats["task_ready"], stats["task_unacked"], stats["task_consumers"]) == (1, 1, 1, 1)
    assert not rig.broker.is_idle()


# -- failed sends --------------------------------------------------------------------
def test_a_busy_peer_gets_its_deliveries_back_not_redelivered_and_retried(rig):
    rig.worker(A, prefetch=2)
    rig.wire.busy.add(A)
    rig.publish("q", b"1", b"2")
    assert rig.broker.tasks_stalled
    delivered = rig.broker.counters["delivered"]
    rig.wire.busy.clear()
    rig.broker.retry_stalled()
    assert not rig.broker.tasks_stalled
    got = rig.deliveries(A)
    assert [(d[3], d[4]) for d in got] == [(False, b"1"), (False, b"2")]  # never arrived: not redelivered
    assert rig.broker.counters["delivered"] == delivered + 2
    assert rig.broker.stats()["task_unacked"] == 2
    queue = rig.broker.tasks.vhosts["/"].queues["q"]
    assert queue.redelivered == 0


def test_a_busy_peer_gets_its_get_reply_back(rig):
    rig.ok(A, p.QueueDeclare(0, "q"))
    rig.publish("q", b"1")
    rig.wire.busy.add(A)
    rig.req += 1
    rig.handle(A, p.Get(rig.req, 1, "q"))
    assert rig.ready() == [b"1"]  # the reply failed: the message is back, not held
    assert rig.broker.stats()["task_unacked"] == 0
    assert not rig.broker.tasks.vhosts["/"].queues["q"].levels[0][0].redelivered


def test_a_gone_peer_is_dropped_and_its_messages_go_to_others_once(rig):
    rig.worker(A, prefetch=3)
    rig.publish("q", b"1", b"2")
    assert [d[4] for d in rig.deliveries(A)] == [b"1", b"2"]
    rig.worker(B, prefetch=10)
    rig.wire.gone.add(A)
    rig.publish("q", b"3", b"4")  # 3 to B (its turn), 4 to A: fails, A is dropped
    assert A not in rig.broker.tasks.clients
    got = rig.deliveries(B)
    assert [d[4] for d in got] == [b"3", b"1", b"2", b"4"]  # each once, what A held in order
    # 1 and 2 reached A: redelivered. (4 never did; it is marked too, as
    # AMQP allows: "may have been delivered before".)
    assert [got[0][3], got[1][3], got[2][3]] == [False, True, True]
    assert rig.broker.stats()["task_unacked"] == 4 and rig.ready() == []
    rig.wire.gone.clear()
    rig.broker.retry_stalled()
    assert rig.take(B) == [] and rig.take(A) == []


def test_a_gone_no_ack_consumer_loses_nothing(rig):
    rig.ok(A, p.QueueDeclare(0, "q"))
    rig.ok(A, p.Consume(0, 1, "q", "auto", True))
    rig.wire.gone.add(A)
    rig.publish("q", b"1", b"2")
    assert A not in rig.broker.tasks.clients
    rig.wire.gone.clear()
    assert rig.ready() == [b"1", b"2"]
    assert rig.broker.memory.used == sum(len(b) + 128 for b in (b"1", b"2"))


def test_send_failed_for_a_reply_only_drops_the_reply(rig):
    rig.worker(A)
    out = p.encode(p.Reply(9))
    rig.broker.send_failed([Outgoing(B, [out])], BUSY)
    rig.broker.send_failed([Outgoing(B, [out])], GONE)  # a gone peer: its task state goes
    assert B not in rig.broker.tasks.clients and A in rig.broker.tasks.clients


# -- closed connections: Ping and probe -------------------------------------------------
def fds(rig: Rig, **by_ident: int) -> None:
    for name, fd in by_ident.items():
        rig.broker.record_fd({"a": A, "b": B, "c": C}[name], fd)


def test_connection_closed_pings_the_clients_that_came_in_on_that_fd(rig):
    rig.worker(A)  # a consumer
    rig.ok(B, p.QueueDeclare(0, "other"))  # holds nothing: pinged too (main since 9e587c8)
    fds(rig, a=7, b=7, c=8)
    rig.ok(C, p.QueueDeclare(0, "q3"))
    rig.ok(C, p.Consume(0, 1, "q3", "c"))  # holds, on another fd
    rig.broker.connection_closed(7, rig.now)
    assert [m for m, _ in rig.take(A)] == [p.Ping()]
    assert [m for m, _ in rig.take(B)] == [p.Ping()]
    assert rig.take(C) == []
    assert sorted(rig.broker.probes) == sorted([A, B])
    rig.broker.connection_closed(99, rig.now)  # nobody there
    assert rig.take(A) == rig.take(B) == rig.take(C) == []


def test_a_client_holding_unacked_messages_is_pinged(rig):
    rig.ok(A, p.QueueDeclare(0, "q"))
    rig.publish("q", b"1")
    rig.ok(B, p.Get(0, 1, "q"))  # the body too: ok() takes the reply only
    fds(rig, b=5)
    rig.broker.connection_closed(5, rig.now)
    assert [m for m, _ in rig.take(B)] == [p.Ping()]


def test_probe_pings_again_at_the_scheduled_times_then_stops(rig):
    rig.worker(A)
    fds(rig, a=7)
    start = rig.now
    rig.broker.connection_closed(7, start)
    assert [m for m, _ in rig.take(A)] == [p.Ping()]
    pings = []
    for step in range(1, 40):  # 1.95 s in 0.05 s steps
        now = start + step * 0.05
        rig.broker.probe(now + 1e-9)
        if [m for m, _ in rig.take(A)] == [p.Ping()]:
            pings.append(round(now - start, 2))
    assert pings == [0.05, 0.2, 1.0]
    assert rig.broker.probes == {}


def test_a_ping_that_fails_drops_the_client_and_gives_back_what_it_held(rig):
    rig.worker(A)
    rig.worker(B, prefetch=1)
    rig.publish("q", b"1", b"2", b"3")
    assert [d[4] for d in rig.deliveries(A)] == [b"1", b"3"]
    assert [d[4] for d in rig.deliveries(B)] == [b"2"]
    fds(rig, a=7)
    rig.wire.gone.add(A)
    rig.broker.connection_closed(7, rig.now)
    rig.wire.pump()
    assert A not in rig.broker.tasks.clients and rig.broker.probes == {}
    assert rig.ready() == [b"1", b"3"]  # B is full: they wait, in order, marked redelivered
    rig.handle(B, p.Ack(1, [1]))
    assert [(d[3], d[4]) for d in rig.deliveries(B)] == [(True, b"1")]


def test_a_client_with_heartbeats_loses_only_its_task_state_when_a_send_finds_it_gone(rig):
    rig.ok(b"layer", p.Hello(0, "layer", 1.0))
    rig.ok(b"layer", p.Open(0, "/"))
    rig.worker(b"layer")
    rig.publish("q", b"1")
    rig.take(b"layer")
    rig.wire.gone.add(b"layer")
    rig.publish("q", b"2")
    assert b"layer" not in rig.broker.tasks.clients and b"layer" in rig.broker.clients  # its heartbeats decide
    assert rig.ready() == [b"1", b"2"]


def test_probes_end_when_the_client_leaves(rig):
    rig.worker(A)
    fds(rig, a=7)
    rig.broker.connection_closed(7, rig.now)
    rig.take(A)
    rig.handle(A, p.Bye())
    assert rig.broker.probes == {} and A not in rig.broker.tasks.clients
    rig.broker.probe(rig.now + 5)
    assert rig.take(A) == []


def test_bye_gives_back_what_the_client_held(rig):
    rig.worker(A)
    rig.publish("q", b"1", b"2")
    rig.take(A)
    rig.handle(A, p.Bye())
    assert rig.ready() == [b"1", b"2"]
    assert rig.broker.memory.used == 2 * (1 + 128)


def test_sweep_expires_task_messages_and_queues(rig):
    rig.ok(A, p.QueueDeclare(0, "q", arguments={"x-message-ttl": 1000}))
    rig.ok(A, p.QueueDeclare(0, "gone-soon", arguments={"x-expires": 2000}))
    rig.publish("q", b"1")
    rig.now += 1
    rig.broker.sweep(rig.now)
    assert rig.ready() == [] and rig.broker.memory.used == 0
    rig.now += 1
    rig.broker.sweep(rig.now)
    assert "gone-soon" not in rig.broker.tasks.vhosts["/"].queues


def test_a_busy_peer_gets_deliveries_from_several_messages_back_in_order(rig):
    rig.worker(A)
    rig.wire.busy.add(A)
    # Three messages to A in one batch: TaskDeliver, a reply, TaskDeliver.
    rig.handle(C, p.Publish(0, "", "q"), b"1", pump=False)
    rig.handle(A, p.QueueDeclare(77, "q"), pump=False)
    rig.handle(C, p.Publish(0, "", "q"), b"2", pump=False)
    rig.handle(C, p.Publish(0, "", "q"), b"3", pump=False)
    rig.wire.pump()
    rig.wire.busy.clear()
    rig.broker.retry_stalled()
    assert [d[4] for d in rig.deliveries(A)] == [b"1", b"2", b"3"]
    assert rig.broker.stats()["task_unacked"] == 3


def test_deliveries_decided_by_consume_precede_its_reply_and_go_with_replies(rig):
    rig.ok(A, p.QueueDeclare(0, "q"))
    rig.publish("q", b"1", b"2")
    rig.broker.handle([A, p.encode(p.Consume(5, 1, "q", "c"))], rig.now)
    [messages] = rig.broker.data_to_send(replies_only=True)  # the shell sends replies at once
    decoded = [(p.decode_to_client(out.frames[0]), out.frames[1:]) for out in messages]
    assert decoded == [(p.TaskDeliver([1, 1], ["c", "c"], [1, 2], [False, False]), [b"1", b"2"]), (p.Reply(5), [])]
    assert rig.broker.data_to_send() == []


def test_a_task_deliver_carries_at_most_max_batch_bodies(rig):
    rig.worker(A)
    for i in range(p.MAX_BATCH + 1):
        rig.handle(C, p.Publish(0, "", "q"), b"%d" % i, pump=False)
    sent = rig.take(A)
    assert [len(bodies) for _, bodies in sent] == [p.MAX_BATCH, 1]
    tags = [tag for msg, _ in sent for tag in msg.tags]
    assert tags == list(range(1, p.MAX_BATCH + 2))
    assert rig.broker.counters["delivered"] == p.MAX_BATCH + 1
