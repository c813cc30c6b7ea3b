"""Celery's features with real ``celery worker`` processes (prefork) on the
broker: each test starts what it needs and waits on what tasks leave in
their trace files (``celery_helpers.Traces``)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import pytest
from celery_helpers import Traces, Worker

from helpers import BrokerThread, wait_for

# Real worker processes start in 1-3 s each here; the default 60 s is too tight.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _task_queues(broker: BrokerThread) -> dict[str, dict]:
    assert broker.server is not None and broker.server.broker is not None
    return {q["name"]: q for q in broker.call(broker.server.broker.tasks.queue_stats, "/")}


def test_delay_with_results_and_a_mebibyte_argument(celery_app: Any, start_worker: Callable[..., Worker]) -> None:
    start_worker()
    assert celery_app.add.delay(2, 3).get(timeout=10) == 5
    assert celery_app.add.apply_async((4, 5), countdown=0.1).get(timeout=10) == 9
    results = [celery_app.add.delay(i, i) for i in range(200)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(200)]
    assert celery_app.size_of.delay("x" * (1 << 20)).get(timeout=20) == 1 << 20


def test_an_eta_longer_than_any_liveness_timeout_runs_once(
    celery_app: Any, start_worker: Callable[..., Worker], traces: Traces
) -> None:
    """The worker holds the ETA task unacknowledged for 8 s, past ZeroMQ's
    heartbeat timeout (3 s) more than twice: the broker never hands it to
    another worker because it is old (the Redis transport's visibility
    timeout does, and runs it again)."""
    start_worker("w1@test")
    start_worker("w2@test")
    sent = time.time()
    celery_app.record.apply_async((traces.path("eta"), "eta-1"), countdown=8)
    celery_app.record.delay(traces.path("now"), "now-1")
    traces.wait("now", 1)
    lines = traces.wait("eta", 1, timeout=30)
    ran_at = float(lines[0].split()[2])
    assert ran_at - sent >= 7.9
    with pytest.raises(AssertionError):
        traces.wait("eta", 2, timeout=3)


def test_a_warm_shutdown_hands_back_eta_tasks(
    celery_app: Any, start_worker: Callable[..., Worker], traces: Traces
) -> None:
    """The worker holds an ETA task unacknowledged; SIGTERM hands it back
    (its connection closes) and another worker runs it at its time, once
    (Celery issue 3501: ETA tasks lost on a worker's end)."""
    first = start_worker("w1@test", "--without-gossip", "--without-mingle")
    sent = time.time()
    celery_app.record.apply_async((traces.path("eta"), "later"), countdown=6)
    wait_for(lambda: _reserved(celery_app, "w1@test") == 1, 10, "w1 to hold the ETA task")
    assert first.stop() == 0
    start_worker("w2@test", "--without-gossip", "--without-mingle")
    lines = traces.wait("eta", 1, timeout=20)
    assert float(lines[0].split()[2]) - sent >= 5.9
    with pytest.raises(AssertionError):
        traces.wait("eta", 2, timeout=1)


def _reserved(celery_app: Any, name: str) -> int:
    scheduled = celery_app.app.control.inspect(destination=[name], limit=1, timeout=5).scheduled() or {}
    return len(scheduled.get(name, []))


def test_acks_late_task_of_a_killed_worker_runs_again_at_once(
    celery_app: Any, start_worker: Callable[..., Worker], traces: Traces
) -> None:
    workers = [start_worker("w1@test"), start_worker("w2@test")]
    celery_app.slow_late.delay(traces.path("late"), "job", 3.0)
    first = traces.wait("late", 1)[0].split()
    pgid = os.getpgid(int(first[2]))
    victim = next(w for w in workers if w.process.pid == pgid)
    killed = time.monotonic()
    victim.kill()
    lines = traces.wait("late", 2, timeout=10)
    restarted = time.monotonic() - killed
    assert lines[1].startswith("start job")
    assert restarted < 5.0, f"redelivered {restarted:.2f}s after the kill"
    lines = traces.wait("late", 3, timeout=15)
    assert [line.split()[0] for line in lines] == ["start", "start", "done"]
    with pytest.raises(AssertionError):
        traces.wait("late", 4, timeout=1)  # completes exactly once
    print(f"acks_late task redelivered {restarted * 1000:.0f} ms after SIGKILL")


@pytest.mark.timeout(600)  # 20 restarts; a warm shutdown may take up to 30 s (celery_helpers.Worker.stop)
def test_warm_restarts_lose_nothing(celery_app: Any, start_worker: Callable[..., Worker], traces: Traces) -> None:
    """20 SIGTERMs of the worker while tasks flow: every task runs. A task
    runs twice only if it was running when a SIGTERM came and the worker's
    main process stopped before it read the pool's "accepted", so its early
    ack was never sent (billiard's shutdown stall; the same with the Redis
    transport, and with RabbitMQ, which also requeues what a closed
    connection did not ack)."""
    tokens = [f"t{i}" for i in range(300)]
    stop = threading.Event()

    def produce() -> None:
        for token in tokens:
            celery_app.record.delay(traces.path("restarts"), token)
            time.sleep(0.01)
        stop.set()

    worker = start_worker("r@test", "--without-gossip", "--without-mingle")
    producer = threading.Thread(target=produce)
    producer.start()
    sigterms: list[float] = []
    for _ in range(20):
        sigterms.append(time.time())
        assert worker.stop() == 0
        worker = start_worker("r@test", "--without-gossip", "--without-mingle")
    producer.join(30)
    worker.wait_ready(celery_app.app)
    traces.wait("restarts", len(tokens), timeout=60)
    wait_for(lambda: {line.split()[0] for line in traces.lines("restarts")} >= set(tokens), 60, "every task")
    runs: dict[str, list[float]] = {}
    for line in traces.lines("restarts"):
        token, _, at = line.split()
        runs.setdefault(token, []).append(float(at))
    assert set(runs) == set(tokens), "lost tasks"
    twice = {token: times for token, times in runs.items() if len(times) > 1}
    for token, times in twice.items():
        assert len(times) == 2, f"{token} ran {len(times)} times"
        assert any(abs(times[0] - t) < 1.0 for t in sigterms), f"{token} ran twice, not around a SIGTERM"
    print(f"20 warm restarts: {len(tokens)} tasks, none lost; {len(twice)} ran again (running at a SIGTERM)")


def test_remote_control(celery_app: Any, start_worker: Callable[..., Worker], traces: Traces) -> None:
    app = celery_app.app
    worker = start_worker("w1@test")
    began = time.monotonic()
    assert app.control.inspect(destination=["w1@test"], limit=1, timeout=5).ping() == {"w1@test": {"ok": "pong"}}
    reply_ms = (time.monotonic() - began) * 1000
    assert reply_ms < 200, f"ping answered in {reply_ms:.0f} ms"
    celery_app.sleepy.delay(traces.path("active"), "busy", 2.0)
    traces.wait("active", 1)
    active = app.control.inspect(destination=["w1@test"], limit=1, timeout=5).active()
    assert [t["name"] for t in active["w1@test"]] == ["celery_app.sleepy"]
    stats = app.control.inspect(destination=["w1@test"], limit=1, timeout=5).stats()["w1@test"]
    assert stats["pool"]["max-concurrency"] == 2
    assert stats["broker"]["transport"] == "dmb"
    # revoke a countdown task before it runs
    doomed = celery_app.record.apply_async((traces.path("revoked"), "no"), countdown=2)
    app.control.revoke(doomed.id)
    celery_app.record.apply_async((traces.path("revoked"), "yes"), countdown=2.5)
    assert traces.wait("revoked", 1, timeout=10)[0].startswith("yes")
    # pool_grow
    app.control.pool_grow(1, destination=["w1@test"], reply=True, timeout=5)

    def processes() -> int:
        stats = app.control.inspect(destination=["w1@test"], limit=1, timeout=5).stats()["w1@test"]
        return len(stats["pool"]["processes"])

    wait_for(lambda: processes() == 3, 10, "a third pool process")
    # shutdown
    app.control.shutdown(destination=["w1@test"])
    wait_for(lambda: worker.process.poll() is not None, 30, "the worker to shut down")


def test_events_reach_an_events_receiver(
    celery_app: Any, start_worker: Callable[..., Worker], task_broker: BrokerThread
) -> None:
    """Events go through a topic exchange (this transport is not Redis):
    the receiver's queue, declared here, gets what the worker sends."""
    app = celery_app.app
    seen: list[str] = []
    done = threading.Event()

    def on_event(event: dict) -> None:
        seen.append(event["type"])
        if event["type"] == "task-succeeded":
            done.set()

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True)
        thread.start()
        wait_for(lambda: any(n.startswith("celeryev.") for n in _task_queues(task_broker)), 10, "the event queue")
        start_worker("w1@test", "-E")
        celery_app.add.delay(1, 2).get(timeout=10)
        assert done.wait(10), f"events seen: {seen}"
        receiver.should_stop = True
        thread.join(10)
    assert {"worker-online", "task-received", "task-started", "task-succeeded"} <= set(seen)


def test_rpc_backend_leaves_no_queues(
    celery_app: Any, start_worker: Callable[..., Worker], task_broker: BrokerThread
) -> None:
    start_worker("w1@test", "--without-gossip", "--without-mingle", "--without-heartbeat")
    before = set(_task_queues(task_broker))
    for i in range(1000):
        assert celery_app.add.delay(i, 1).get(timeout=10) == i + 1
    during = set(_task_queues(task_broker)) - before
    assert len(during) == 1  # this client's one reply queue
    celery_app.app.backend.result_consumer.stop()
    celery_app.app.backend.result_consumer._connection.close()
    wait_for(lambda: set(_task_queues(task_broker)) <= before, 5, "the reply queue to go")


def test_routing_to_several_queues_and_priorities(
    celery_app: Any, start_worker: Callable[..., Worker], traces: Traces
) -> None:
    app = celery_app.app
    # Queue the work before any worker runs, so priority decides the order.
    for n, priority in enumerate([1, 9, 5, 9, 0]):
        celery_app.record.apply_async((traces.path("prio"), f"p{priority}-{n}"), queue="jobs", priority=priority)
    celery_app.record.apply_async((traces.path("mail"), "m"), queue="mail")
    start_worker("w1@test", "-Q", "jobs,mail", "-c", "1", "--prefetch-multiplier", "1")
    assert traces.wait("mail", 1)[0].startswith("m ")
    ran = [line.split()[0] for line in traces.wait("prio", 5)]
    # The first one may be fetched while the queue fills; the rest run 9 first.
    assert [r.split("-")[0] for r in ran[1:]] == sorted((r.split("-")[0] for r in ran[1:]), key=lambda p: -int(p[1:]))
    assert app.conf.task_queue_max_priority == 9


def test_purge_counts_what_it_removed(celery_app: Any, task_broker: BrokerThread, traces: Traces) -> None:
    for i in range(37):
        celery_app.record.delay(traces.path("purged"), f"x{i}")
    assert celery_app.app.control.purge() == 37
    assert _task_queues(task_broker)["celery"]["ready"] == 0


def test_groups_and_chords_with_a_result_backend(
    celery_app: Any, start_worker: Callable[..., Worker], tmp_path: Any
) -> None:
    from celery import chord, group

    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    celery_app.app.conf.result_backend = backend  # before the app first uses its backend
    start_worker("w1@test", backend=backend)
    assert group(celery_app.add.s(i, i) for i in range(10)).apply_async().get(timeout=20) == [2 * i for i in range(10)]
    assert chord((celery_app.add.s(i, i) for i in range(10)), celery_app.total.s()).apply_async().get(timeout=30) == 90


def test_beat_sends_periodic_tasks(
    celery_app: Any, start_worker: Callable[..., Worker], traces: Traces, tmp_path: Any
) -> None:
    schedule = str(tmp_path / "beat-schedule")
    start_worker("w1@test", "-B", "-s", schedule, env={"BEAT_TRACE": traces.path("beat")})
    ticks = traces.wait("beat", 3, timeout=30)
    assert all(line.startswith("tick ") for line in ticks)
