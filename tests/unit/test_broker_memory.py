"""The broker-wide memory limit (``max_memory``) and its exact accounting:
the counter checked after every path a message takes in or out of a queue.
Fake socket, fake clock; no zmq I/O."""

from __future__ import annotations

import logging

import pytest
from test_broker import A, B, C, Rig

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker._memory import MESSAGE_OVERHEAD, default_max_memory, format_size, parse_size
from django_message_broker.server.broker import Broker

pytestmark = pytest.mark.timeout(10)

K = 1000  # body size used below
SIZE = K + MESSAGE_OVERHEAD  # what one such message counts


def body(tag: int) -> bytes:
    return b"%04d" % tag + b"." * (K - 4)


def used(rig: Rig) -> int:
    """The meter, checked against a recount of every queue."""
    recount = sum(m.size for q in rig.broker.queues.values() for m in q.queue)
    assert rig.broker.memory.used == recount
    return rig.broker.memory.used


# -- sizes ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("256MB", 256_000_000), ("256mb", 256_000_000), ("1GiB", 1 << 30), ("1.5KiB", 1536), (7, 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "12 parsecs", "MB", True, "1e3"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_and_default():
    assert format_size(256 << 20) == "256 MiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(256_000_000) == "256 MB"
    assert format_size(1000) == "1 kB"
    assert format_size(999) == "999 bytes"
    assert default_max_memory() > 0
    assert Broker(clock=lambda: 0.0).memory.limit == default_max_memory()


# -- accounting, path by path -----------------------------------------------------
def test_counter_is_exact_on_every_path():
    rig = Rig(max_memory=100 * SIZE)
    rig.hello(A, B, C)
    assert used(rig) == 0
    # push (checked and unchecked)
    rig.send(A, "ch", body(1), body(2), body(3))
    rig.send(A, "ch", body(4), checked=False)
    assert used(rig) == 4 * SIZE
    # deliver: delivered messages leave the count
    rig.handle(B, p.Subscribe(0, "ch", 2))
    assert len(rig.wire.delivered(B)) == 2
    assert used(rig) == 2 * SIZE
    # Return: back in
    rig.handle(B, p.Return("ch", [30.0, 30.0], rig.broker.epoch), body(1), body(2))
    assert used(rig) == 4 * SIZE
    rig.handle(B, p.Unsubscribe(1, "ch"))
    rig.wire.take(B)
    # lazy expiry in deliver
    rig.send(A, "short", body(5), ttl=1)
    rig.send(A, "short", body(6), ttl=100)
    assert used(rig) == 6 * SIZE
    rig.now += 2
    rig.handle(C, p.Subscribe(0, "short", 10))
    assert rig.wire.delivered(C) == [body(6)]
    assert used(rig) == 4 * SIZE
    # expiry by the sweeper (expire)
    rig.send(A, "soon", body(7), body(8), ttl=1)
    assert used(rig) == 6 * SIZE
    rig.now += 2
    rig.handle(A, p.Heartbeat(1))
    rig.handle(B, p.Heartbeat(1))
    rig.handle(C, p.Heartbeat(1))
    rig.broker.sweep(rig.now)
    assert used(rig) == 4 * SIZE
    # group_send: one body in N queues counts N times
    for req, channel in enumerate(("g1", "g2", "g3")):
        rig.handle(A, p.GroupAdd(req, "room", channel, 60))
    rig.handle(A, p.GroupSend(9, "room", 60, 10), body(9))
    assert used(rig) == 7 * SIZE
    # a busy peer: the run goes back to the queue (put_back) and counts again
    rig.wire.busy.add(B)
    rig.handle(B, p.Subscribe(0, "g1", 5))
    assert used(rig) == 7 * SIZE
    rig.wire.busy.discard(B)
    rig.retry_stalled()
    assert rig.wire.delivered(B) == [body(9)]
    assert used(rig) == 6 * SIZE
    # flush: nothing queued, nothing counted
    rig.wire.take(A)
    rig.handle(A, p.Flush(10))
    assert used(rig) == 0 and rig.broker.stats()["memory"] == 0


def test_send_past_the_limit_is_refused_with_the_limit_named(caplog):
    rig = Rig(max_memory=3 * SIZE)
    rig.hello(A, B)
    rig.send(A, "ch", body(1), body(2), req=1)
    assert rig.wire.replies(A)[0].code == 0
    with caplog.at_level(logging.WARNING, "django_message_broker.server"):
        rig.send(A, "ch", body(3), body(4), req=2)  # checked: all or nothing
        err = rig.error(A)
        rig.send(A, "other", body(5), body(6), req=3)
        rig.error(A)
    assert isinstance(err, ex.QueueFull)
    assert err.reason == f"broker memory limit {format_size(3 * SIZE)} reached"
    assert err.reason in str(err)
    assert rig.broker.queued() == 2 and used(rig) == 2 * SIZE  # nothing of the refused batches
    assert rig.broker.counters["refused_memory"] == 4
    assert len([r for r in caplog.records if "memory limit" in r.getMessage()]) == 1  # rate-limited
    # unchecked: what fits goes in, the rest is refused with the same reason
    rig.send(A, "ch", body(7), body(8), req=4, checked=False)
    err = rig.error(A)
    assert isinstance(err, ex.QueueFull) and "memory limit" in err.reason
    assert used(rig) == 3 * SIZE
    # room again once a consumer takes messages
    rig.handle(B, p.Subscribe(0, "ch", 3))
    assert len(rig.wire.delivered(B)) == 3
    rig.send(A, "ch", body(9), req=5)
    assert rig.wire.replies(A)[0].code == 0


def test_expired_messages_make_room_before_a_refusal():
    rig = Rig(max_memory=2 * SIZE)
    rig.hello(A)
    rig.send(A, "ch", body(1), body(2), ttl=1)
    rig.wire.take(A)
    rig.now += 2
    rig.send(A, "ch", body(3), req=2)
    assert rig.wire.replies(A)[0].code == 0
    assert used(rig) == SIZE


def test_group_send_skips_members_past_the_limit():
    rig = Rig(max_memory=2 * SIZE)
    rig.hello(A)
    for req, channel in enumerate(("a", "b", "c")):
        rig.handle(A, p.GroupAdd(req, "room", channel, 60))
    rig.wire.take(A)
    rig.handle(A, p.GroupSend(9, "room", 60, 10), body(1))
    assert rig.wire.replies(A) == [p.Reply(9, 0, "", [2, 1])]
    assert used(rig) == 2 * SIZE and rig.broker.counters["refused_memory"] == 1


def test_return_keeps_what_fits():
    rig = Rig(max_memory=3 * SIZE)
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "ch", 3))
    rig.send(A, "ch", body(1), body(2), body(3))
    assert len(rig.wire.delivered(B)) == 3
    rig.send(A, "other", body(4), body(5))
    assert used(rig) == 2 * SIZE
    rig.handle(B, p.Unsubscribe(1, "ch"))
    rig.handle(B, p.Return("ch", [30.0] * 3, rig.broker.epoch), body(1), body(2), body(3))
    assert used(rig) == 3 * SIZE
    assert [m.body for m in rig.broker.queues["ch"].queue] == [body(1)]  # the oldest
    assert rig.broker.counters["refused_memory"] == 2


def test_channel_full_carries_the_reason():
    from django_message_broker.layer import ChannelFull

    err = ex.from_wire(1, "", ex.QueueFull("ch", 0, "broker memory limit 256 MiB reached").fields())
    assert isinstance(err, ex.QueueFull) and err.reason == "broker memory limit 256 MiB reached"
    full = ChannelFull("ch", err.capacity, err.reason)
    assert "broker memory limit 256 MiB reached" in str(full)
    assert "capacity 5" in str(ex.QueueFull("ch", 5))


# -- where the limit is set ------------------------------------------------------------
def test_serve_takes_max_memory_as_bytes_or_text(monkeypatch, capsys):
    from django_message_broker import __main__ as cli

    seen: dict = {}

    async def fake_serve(address: str, **options: object) -> None:
        seen.update(options)

    monkeypatch.setattr(cli, "serve", fake_serve)
    assert cli.main(["serve", "--max-memory", "256MB"]) == 0
    assert seen["max_memory"] == 256_000_000
    assert cli.main(["serve", "--max-memory", "1GiB"]) == 0 and seen["max_memory"] == 1 << 30
    assert cli.main(["serve"]) == 0 and seen["max_memory"] is None  # the broker's default
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--max-memory", "lots"])
    assert exit_info.value.code == 2 and "not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "quarter of the host's physical memory" in " ".join(capsys.readouterr().out.split())


def test_the_embedded_broker_gets_embedded_max_memory(embedded_starts):
    from django_message_broker import embedded
    from django_message_broker.options import ClientOptions

    started = embedded_starts
    max_memory = ClientOptions(embedded_max_memory="64MiB").embedded_max_memory
    assert max_memory == 64 << 20
    for limit in (max_memory, None):
        with pytest.raises(RuntimeError, match="exited"):
            embedded.ensure_broker("tcp://127.0.0.1:1", max_memory=limit, timeout=1)
    with_limit, without = started
    assert with_limit[with_limit.index("--max-memory") + 1] == str(64 << 20)
    assert "--max-memory" not in without
