"""Shared fixtures: a real broker on a free loopback port, in its own thread
and event loop, so that sync and async tests can both talk to it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from django_message_broker.server.server import BrokerServer
from helpers import Keys, make_keys


class BrokerThread:
    """A ``BrokerServer`` running on its own loop in a daemon thread."""

    def __init__(self, address: str = "tcp://127.0.0.1:0", **options: Any) -> None:
        self.requested = address
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.server: BrokerServer | None = None
        self.address = ""
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                self.server = BrokerServer(self.requested, **self.options)
                await self.server.start()
                self.address = self.server.address
            except BaseException as exc:  # reported to start()
                self._error = exc
                return
            finally:
                self._started.set()
            await self.server.wait_closed()

        self.loop.run_until_complete(main())

    def start(self) -> BrokerThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("broker did not start")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the broker's loop and return its result."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self._thread.join(10)
        if not self.loop.is_closed() and not self._thread.is_alive():
            self.loop.close()


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
