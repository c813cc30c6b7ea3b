"""The task model's durable side, pure: what it journals for the store,
how it restores, and cold messages (bodies on disk until delivered)."""

from __future__ import annotations

from typing import Any

from django_message_broker._memory import MESSAGE_OVERHEAD
from django_message_broker.server.store import StoredState
from django_message_broker.server.tasks import Delivery, Tasks
from helpers import FakeClock

A = b"conn-a"


def durable_tasks(disk: dict[int, bytes], hot_limit: int = 2) -> tuple[Tasks, list[Delivery]]:
    sent: list[Delivery] = []
    tasks = Tasks(
        clock=FakeClock(100.0),
        sink=lambda ident, delivery: sent.append(delivery),
        durable=True,
        wall_clock=lambda: 1_000_000.0,
        load_body=disk.get,
        hot_limit=hot_limit,
    )
    tasks.open(A, "/")
    tasks.declare_queue(A, "jobs", durable=True)
    return tasks, sent


def kinds(ops: list[tuple]) -> list[str]:
    return [op[0] for op in ops]


def test_a_persistent_publish_to_a_durable_queue_is_journaled_and_its_life_too() -> None:
    tasks, sent = durable_tasks({})
    assert kinds(tasks.take_journal()[0]) == ["q+"]
    tasks.publish(A, "", "jobs", b"one", 3, 0.0, persistent=True)
    assert tasks.stored
    tasks.publish(A, "", "jobs", b"two", 0, 0.0, persistent=False)  # not persistent: memory only
    assert not tasks.stored
    ops, puts = tasks.take_journal()
    assert ops == [("put", 1, "/", "jobs", 3, None, b"one")] and [m.body for _, m in puts] == [b"one"]
    tasks.consume(A, 1, "jobs", "c")
    assert kinds(tasks.take_journal()[0]) == ["dlv"]  # the stored one; the other is not stored
    tasks.ack(A, 1, [d.tag for d in sent])
    assert tasks.take_journal()[0] == [("del", 1)]


def test_ttls_are_stored_as_wall_clock_deadlines() -> None:
    tasks, _ = durable_tasks({})
    tasks.take_journal()
    tasks.publish(A, "", "jobs", b"x", 0, 30.0, persistent=True)
    (op,), _ = tasks.take_journal()
    assert op[5] == 1_000_030.0


def test_deep_messages_go_cold_once_on_disk_and_are_read_back_when_delivered() -> None:
    disk: dict[int, bytes] = {}
    tasks, sent = durable_tasks(disk, hot_limit=2)
    tasks.take_journal()
    for n in range(5):
        tasks.publish(A, "", "jobs", f"m{n}".encode(), 0, 0.0, persistent=True)
    ops, puts = tasks.take_journal()
    disk.update({op[1]: op[6] for op in ops})  # the store committed them
    before = tasks.meter.used
    assert tasks.cool(puts) == 3  # only what waits behind more than hot_limit
    queue = tasks.vhosts["/"].queues["jobs"]
    assert [m.body for m in queue.levels[0]] == [b"m0", b"m1", None, None, None]  # the head stays in memory
    assert tasks.meter.used == before - 3 * len(b"m0")
    assert tasks.meter.used == sum(m.size for m in queue.levels[0])
    tasks.consume(A, 1, "jobs", "c")
    assert [d.body for d in sent] == [b"m0", b"m1", b"m2", b"m3", b"m4"]  # cold ones read from "disk"


def test_restored_messages_are_cold_and_a_missing_body_is_dropped_and_counted() -> None:
    disk = {7: b"seven", 8: b"eight"}
    sent: list[Delivery] = []
    state = StoredState(
        queues=[("/", "jobs", {}, False)],
        messages=[
            (7, "/", "jobs", 0, None, True, None),
            (9, "/", "jobs", 0, None, False, None),  # not on disk any more
            (8, "/", "jobs", 0, 999_999.0, False, None),  # expired in the past (wall clock): dropped
            (8, "/", "gone", 0, None, False, None),  # its queue is not durable any more
        ],
    )
    fresh = Tasks(clock=FakeClock(5.0), sink=lambda i, d: sent.append(d), durable=True,
                  wall_clock=lambda: 1_000_000.0, load_body=disk.get)  # fmt: skip
    assert fresh.restore(state) == 2
    assert kinds(fresh.take_journal()[0]) == ["del", "del"]
    queue = fresh.vhosts["/"].queues["jobs"]
    assert [m.body for m in queue.levels[0]] == [None, None]
    assert fresh.meter.used == 2 * MESSAGE_OVERHEAD
    assert fresh.next_sid == 10
    fresh.open(A, "/")
    fresh.consume(A, 1, "jobs", "c")
    assert [(d.body, d.message.redelivered) for d in sent] == [(b"seven", True)]
    assert fresh.lost_bodies == 1 and fresh.meter.used == 0


def test_purge_delete_expiry_and_drop_forget_stored_messages() -> None:
    tasks, sent = durable_tasks({})
    for n in range(3):  # the first expires (expiry looks at the head, as RabbitMQ)
        tasks.publish(A, "", "jobs", b"x", 0, 0.5 if n == 0 else 0.0, persistent=True)
    tasks.take_journal()
    clock: Any = tasks.clock
    clock.advance(1.0)
    tasks.sweep(clock())
    assert tasks.take_journal()[0] == [("del", 1)]
    assert tasks.purge(A, "jobs") == 2
    assert sorted(tasks.take_journal()[0]) == [("del", 2), ("del", 3)]
    tasks.publish(A, "", "jobs", b"y", 0, 0.0, persistent=True)
    tasks.consume(A, 1, "jobs", "c")
    tasks.reject(A, 1, [sent[0].tag], requeue=False)
    assert kinds(tasks.take_journal()[0]) == ["put", "dlv", "del"]
    tasks.delete_queue(A, "jobs")
    assert tasks.take_journal()[0] == [("q-", "/", "jobs")]
