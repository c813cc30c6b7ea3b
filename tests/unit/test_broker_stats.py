"""The broker's stats (issue #13 item 1), on the sans-IO core with a fake
clock: per-channel counters, clients and their processes, rates from the
per-second ring, the bounded detailed form of ``Stats(top=N)``, and the
flat form unchanged for ``top=0``."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.server.broker import Broker
from django_message_broker.server.stats import HISTORY, MAX_TOP, RateHistory
from helpers import FakeClock, Wire

A, B, C = b"client-a", b"client-b", b"client-c"
FLAT_KEYS = {
    "instance", "clients", "queues", "queued", "memory", "max_memory", "held", "groups", "memberships",
    "received", "delivered", "refused_full", "refused_memory", "errors", "expired",
}  # fmt: skip


class Rig:
    def __init__(self, **options: Any) -> None:
        self.clock = FakeClock(100.0)
        options.setdefault("rss", lambda: 12345678)
        self.broker = Broker(clock=self.clock, version="9.9.9", **options)
        self.wire = Wire(self.broker)

    def handle(self, ident: bytes, cmd: Any, *bodies: bytes) -> None:
        self.broker.handle([ident, p.encode(cmd), *bodies], self.clock.now)
        self.wire.pump()

    def hello(self, ident: bytes, **process: Any) -> None:
        self.handle(ident, p.Hello(1, ident.decode(), 1.0, **process))
        self.wire.take(ident)

    def stats(self, ident: bytes, top: int = 0) -> Any:
        self.wire.take(ident)  # earlier replies
        self.handle(ident, p.Stats(9, top))
        [reply] = self.wire.replies(ident)
        if reply.code:
            raise ex.from_wire(reply.code, reply.detail, reply.value)
        return reply.value

    def sweep(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.broker.sweep(self.clock.now)
        self.wire.pump()


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_top_zero_is_the_old_flat_dict(rig):
    rig.hello(A)
    flat = set(rig.broker.stats())
    assert flat >= FLAT_KEYS
    assert set(rig.stats(A)) == flat
    assert set(rig.stats(A, 0)) == flat


def test_an_old_stats_header_without_top_gets_the_flat_dict(rig):
    """A client from before ``top`` existed sends ``[11, req]``."""
    rig.hello(A)
    old = bytes([p.VERSION]) + msgspec.msgpack.encode([11, 4])
    rig.broker.handle([A, old], rig.clock.now)
    [reply] = rig.wire.replies(A)
    assert reply.req == 4 and set(reply.value) == set(rig.broker.stats())


def test_an_old_hello_without_process_fields_is_accepted(rig):
    old = bytes([p.VERSION]) + msgspec.msgpack.encode([1, 3, "old-client", 1.0])
    rig.broker.handle([A, old], rig.clock.now)
    [reply] = rig.wire.replies(A)
    assert reply.code == 0
    [client] = rig.stats(A, 5)["clients"]
    assert (client["id"], client["host"], client["pid"], client["name"]) == ("old-client", "", 0, "")


def test_per_channel_counters(rig):
    rig.hello(A)
    rig.hello(B)
    rig.handle(A, p.Send(1, "work", 60, 3, True), b"1", b"2")
    rig.handle(A, p.Send(2, "work", 60, 3, True), b"3", b"4")  # refused whole: 2 over capacity
    rig.handle(B, p.Subscribe(0, "work", 1))
    rig.handle(A, p.Send(3, "gone", 1, 10, True), b"x")
    rig.clock.advance(2)  # less than the clients' heartbeat timeout
    rig.broker.sweep(rig.clock.now)  # "gone"'s message expires
    rig.wire.take(A)
    assert rig.wire.delivered(B) == [b"1"]
    detail = rig.stats(A, 10)
    rows = {row["name"]: row for row in detail["channels"]}
    assert rows["work"] == {
        "name": "work", "queued": 1, "held": 1, "receivers": 1,
        "enqueued": 2, "delivered": 1, "expired": 0, "refused_full": 2,
    }  # fmt: skip
    # "gone" expired empty with no receiver: the broker forgot it, not its counts
    assert "gone" not in rows
    assert (detail["totals"]["expired"], detail["totals"]["enqueued"]) == (1, 3)


def test_a_delivery_that_fails_is_not_counted_delivered(rig):
    rig.hello(A)
    rig.hello(B)
    rig.wire.busy.add(B)
    rig.handle(B, p.Subscribe(0, "work", 5))
    rig.handle(A, p.Send(1, "work", 60, 10, True), b"1", b"2")
    [row] = rig.stats(A, 1)["channels"]
    assert (row["queued"], row["delivered"], row["held"]) == (2, 0, 0)
    assert rig.broker.stats()["delivered"] == 0


def test_clients_carry_their_process_credit_and_held(rig):
    rig.hello(A, host="web-1", pid=4242, name="manage.py runworker")
    rig.hello(B, host="web-2", pid=7, name="uvicorn mysite.asgi:application")
    rig.handle(B, p.Subscribe(0, "jobs", 8))
    rig.handle(A, p.Send(1, "jobs", 60, 100, True), b"a", b"b", b"c")
    rig.clock.advance(2.5)
    detail = rig.stats(A, 10)
    clients = {c["host"]: c for c in detail["clients"]}
    assert clients["web-2"] == {
        "id": "client-b", "host": "web-2", "pid": 7, "name": "uvicorn mysite.asgi:application",
        "connected": 2.5, "channels": 1, "credit": 5, "held": 3,
    }  # fmt: skip
    assert clients["web-1"]["pid"] == 4242 and clients["web-1"]["held"] == 0
    assert detail["clients"][0]["host"] == "web-2"  # the client holding most comes first


def test_long_process_fields_are_cut_not_refused(rig):
    rig.hello(A, host="h" * 1000, pid=1, name="n" * 1000)
    [client] = rig.stats(A, 1)["clients"]
    assert len(client["host"]) == 255 and len(client["name"]) == 255


def test_detailed_form_is_bounded_and_sums_the_rest(rig):
    rig.hello(A)
    for i in range(20):
        rig.handle(A, p.Send(i, f"ch{i:02d}", 60, 100, True), *[b"x"] * (i + 1))
    detail = rig.stats(A, 3)
    assert [row["name"] for row in detail["channels"]] == ["ch19", "ch18", "ch17"]
    other = detail["other_channels"]
    assert other["channels"] == 17
    assert other["queued"] == sum(range(1, 18))
    assert other["enqueued"] == sum(range(1, 18))
    totals = detail["totals"]
    assert set(totals) >= FLAT_KEYS
    assert totals["queued"] == sum(range(1, 21)) == totals["enqueued"]
    assert totals["queued_bytes"] == rig.broker.memory.used
    assert totals["bytes_in"] == sum(range(1, 21))  # one-byte bodies
    assert (totals["rss"], totals["version"]) == (12345678, "9.9.9")
    assert detail["other_clients"] == 0


def test_top_is_capped_and_a_bad_top_is_a_protocol_error(rig):
    rig.hello(A)
    assert rig.stats(A, 10**9)["top"] == MAX_TOP
    with pytest.raises(ex.ProtocolError, match="top"):
        rig.stats(A, -1)
    rig.broker.handle([A, bytes([p.VERSION]) + msgspec.msgpack.encode([11, 5, "ten"])], rig.clock.now)
    [reply] = rig.wire.replies(A)
    assert reply.code == ex.ProtocolError.code and reply.req == 0
    assert rig.stats(A)["errors"] == 2  # the broker goes on


def test_uptime_and_rates_from_the_per_second_ring(rig):
    rig.hello(A)
    rig.hello(B)
    rig.handle(B, p.Subscribe(0, "ch", 1000))
    rig.sweep()  # first sample
    rig.handle(A, p.Send(1, "ch", 60, 1000, True), *[b"x" * 72] * 50)
    rig.sweep(2.0)
    totals = rig.stats(A, 1)["totals"]
    assert totals["uptime"] == 3.0
    assert totals["rates"] == {"messages_in": 25.0, "delivered": 25.0, "bytes_in": 1800.0}
    rig.sweep()
    assert rig.stats(A, 1)["totals"]["rates"] == {"messages_in": 0.0, "delivered": 0.0, "bytes_in": 0.0}
    history = rig.stats(A, 1)["history"]
    assert history["messages_in"] == [25.0, 0.0]
    assert history["seconds"] == [1.0, 0.0]


def test_totals_survive_the_queues_the_broker_forgets(rig):
    rig.hello(A)
    rig.hello(B)
    rig.handle(A, p.Send(1, "once", 60, 10, True), b"x")
    rig.handle(B, p.Subscribe(0, "once", 1))
    rig.handle(B, p.Consumed(0, ["once"], [1]))
    rig.handle(B, p.Unsubscribe(2, "once"))
    assert "once" not in rig.broker.queues
    assert rig.stats(A, 1)["totals"]["enqueued"] == 1


def test_rate_history_is_a_bounded_ring():
    ring = RateHistory()
    for second in range(HISTORY + 50):
        ring.sample(float(second), second * 2, second, second * 100)
    rates = ring.rates()
    assert len(rates["messages_in"]) == HISTORY
    assert set(rates["messages_in"]) == {2.0} and set(rates["bytes_in"]) == {100.0}
    ring.sample(float(HISTORY + 49), 0, 0, 0)  # time did not move: ignored
    assert ring.latest()["delivered"] == 1.0
