"""Shared fixtures: a real broker on a free loopback port, in its own thread
and event loop (``helpers.BrokerThread``), so that sync and async tests can
both talk to it; CURVE keys and a CURVE broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import BrokerThread, Keys, make_keys


@pytest.fixture(autouse=True, scope="session")
def _data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Embedded brokers started by the tests keep their durable queues in a
    temporary directory, not in the home directory."""
    import os

    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    """A fresh broker on a free port; ``broker.address`` to connect."""
    thread = BrokerThread().start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def broker_factory() -> Iterator[Any]:
    """Start brokers with options (``broker_factory(address, **options)``)."""
    started: list[BrokerThread] = []

    def start(address: str = "tcp://127.0.0.1:0", **options: Any) -> BrokerThread:
        thread = BrokerThread(address, **options).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """CURVE certificates in ``tmp_path`` (see ``helpers.Keys``)."""
    return make_keys(tmp_path)


@pytest.fixture
def curve_broker(broker_factory: Any, keys: Keys) -> BrokerThread:
    """A CURVE broker on a free port that admits only ``keys.good_*``."""
    return broker_factory(secret_key=str(keys.broker_secret), authorized_keys=str(keys.authorized))


@pytest.fixture
def embedded_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """The command lines ``embedded.ensure_broker`` would start, recorded
    instead of run: nothing answers, and each started "broker" exits at once
    (status 1). Its lock and log files go to ``tmp_path``."""
    from django_message_broker import embedded

    started: list[list[str]] = []

    class FakeProcess:
        pid = 1
        returncode = 1

        def __init__(self, command: list[str], **kwargs: Any) -> None:
            started.append(command)

        def poll(self) -> int:
            return 1

    monkeypatch.setattr(embedded, "probe", lambda address, timeout=0.3, **keys: False)
    monkeypatch.setattr(embedded.subprocess, "Popen", FakeProcess)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return started
