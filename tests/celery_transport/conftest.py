"""Fixtures for the kombu transport and real Celery workers (see
``celery_helpers``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from celery_helpers import HERE, Traces, Worker, dmb_url

from helpers import BrokerThread


@pytest.fixture
def task_broker() -> Iterator[BrokerThread]:
    thread = BrokerThread().start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def traces(tmp_path: Path) -> Traces:
    directory = tmp_path / "traces"
    directory.mkdir()
    return Traces(directory)


@pytest.fixture
def celery_app(task_broker: BrokerThread, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The test app (``celery_app.app``) configured for ``task_broker``."""
    monkeypatch.setenv("BROKER", dmb_url(task_broker.address))
    monkeypatch.setenv("BACKEND", "rpc://")
    sys.path.insert(0, str(HERE))
    sys.modules.pop("celery_app", None)  # a fresh app (and producer pool, and backend) per test
    try:
        import celery_app as module

        yield module
    finally:
        sys.path.remove(str(HERE))
        sys.modules.pop("celery_app", None)
        module.app.pool.force_close_all()
        module.app.close()


@pytest.fixture
def start_worker(task_broker: BrokerThread, tmp_path: Path, celery_app: Any) -> Iterator[Callable[..., Worker]]:
    """Start ``celery worker`` processes on ``task_broker``; all are stopped
    at the end (and their logs shown if the test failed)."""
    workers: list[Worker] = []

    def start(name: Optional[str] = None, *args: str, ready: bool = True, **kwargs: Any) -> Worker:
        name = name or f"w{len(workers) + 1}@test"
        log = tmp_path / f"{name.split('@')[0]}-{len(workers)}.log"
        worker = Worker(dmb_url(task_broker.address), name, log, *args, **kwargs)
        workers.append(worker)
        if ready:
            worker.wait_ready(celery_app.app)
        return worker

    yield start
    for worker in workers:
        worker.stop()
