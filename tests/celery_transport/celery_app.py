"""The Celery app the worker tests run (``celery -A celery_app worker``).
Broker and result backend come from the environment (the tests set them)."""

from __future__ import annotations

import os
import time

from celery import Celery

import django_message_broker.celery  # noqa: F401  (registers dmb://)

app = Celery("celery_app", broker=os.environ.get("BROKER", "dmb://"), backend=os.environ.get("BACKEND", "rpc://"))
app.conf.update(
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_queue_max_priority=9,
    task_default_priority=0,
    worker_prefetch_multiplier=4,
)
if os.environ.get("BEAT_TRACE"):  # celery beat's test: a task every half second
    app.conf.beat_schedule = {
        "tick": {"task": "celery_app.record", "schedule": 0.5, "args": (os.environ["BEAT_TRACE"], "tick")}
    }


def _trace(path: str, text: str) -> None:
    with open(path, "a") as f:  # one short write: lines from many processes do not interleave
        f.write(f"{text}\n")


# shared=False: the tests import a fresh app per test; shared tasks would
# register with every app made since.
@app.task(shared=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(shared=False)
def record(path: str, token: str) -> str:
    _trace(path, f"{token} {os.getpid()} {time.time():.6f}")
    return token


@app.task(shared=False, acks_late=True)
def slow_late(path: str, token: str, seconds: float) -> str:
    """acks_late: acknowledged only when it returns."""
    _trace(path, f"start {token} {os.getpid()} {time.time():.6f}")
    time.sleep(seconds)
    _trace(path, f"done {token} {os.getpid()} {time.time():.6f}")
    return token


@app.task(shared=False)
def sleepy(path: str, token: str, seconds: float) -> str:
    _trace(path, f"start {token}")
    time.sleep(seconds)
    _trace(path, f"done {token}")
    return token


@app.task(shared=False)
def size_of(data: str) -> int:
    return len(data)


@app.task(shared=False)
def total(numbers: list) -> int:
    return sum(numbers)
