"""The Celery app of ``celery_bench.py``: the worker runs it with
``celery -A benchmarks.celery_app worker``, the harness publishes with it.

The broker comes from ``DMB_BENCH_BROKER`` (any kombu URL: ``dmb://``,
``redis://``, ``pyamqp://``). Tasks ignore their results: there is no result
backend. Instead each task appends one line to a file in ``DMB_BENCH_DIR``
(``O_APPEND``: one ``write`` per task, atomic for a line, so the worker's two
pool processes share the file). The harness counts the lines to know when the
work is done and reads the timestamps in them. The cost is the same
syscall whatever the broker.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.signals import worker_ready

#: The task names, for ``send_task`` from an app that did not define them.
NOOP, STAMP, WARM = "benchmarks.celery_app.noop", "benchmarks.celery_app.stamp", "benchmarks.celery_app.warm"


def make_app(broker: str) -> Celery:
    """An app on ``broker``, configured alike for the worker and the producer."""
    if broker.startswith("dmb"):
        import django_message_broker.celery  # noqa: F401  (registers the dmb:// scheme)
    app = Celery("dmb_bench", broker=broker, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
    )
    return app


app = make_app(os.environ.get("DMB_BENCH_BROKER", "dmb://127.0.0.1:5556"))

_files: dict[str, tuple[int, int]] = {}  # name -> (pid, fd): fds are not reused across a fork


def _append(name: str, line: str) -> None:
    pid = os.getpid()
    entry = _files.get(name)
    if entry is None or entry[0] != pid:
        path = os.path.join(os.environ["DMB_BENCH_DIR"], name)
        entry = (pid, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        _files[name] = entry
    os.write(entry[1], line.encode())


@app.task(ignore_result=True)
def noop() -> None:
    """Throughput: an empty task that records when it ran."""
    _append("done", f"{time.time():.6f}\n")


@app.task(ignore_result=True)
def stamp(sent: float) -> None:
    """Latency: the time the task started and the time it was sent (same host clock)."""
    _append("latency", f"{sent:.6f} {time.time():.6f}\n")


@app.task(ignore_result=True)
def warm(n: int) -> None:
    _append("warm", f"{n}\n")


@worker_ready.connect
def _ready(**_: object) -> None:
    """The worker consumes: the harness waits for this file."""
    if "DMB_BENCH_DIR" in os.environ:
        _append("ready", f"{os.getpid()}\n")
