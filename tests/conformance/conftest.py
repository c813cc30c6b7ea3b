"""Fixtures for the channel-layer conformance suite.

Every test in this directory runs twice: against ``ChannelsServerLayer``
(``dmb``, on the real broker of the ``broker`` fixture) and against
``channels_redis.core.RedisChannelLayer`` (``redis``, on a redis-server this
suite starts itself on a free loopback port). The reference layer is there
so that each test shows the behaviour is the contract, not an accident of our
implementation; where the two differ the test says so explicitly, per layer,
and docs/channels-redis-deviations.md explains why.

Use ``make_layer(**config)`` for a layer with per-test options (``capacity``,
``expiry``, ``group_expiry``, ``channel_capacity``...): each call makes a
separate instance (a separate client/connection pool). Every layer made is
flushed and closed at teardown.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from typing import Any, Callable, Iterator

import pytest

from django_message_broker.layer import ChannelsServerLayer
from helpers import free_port

LAYER_KINDS = ["dmb", "redis"]


class RedisServer:
    """A throwaway redis-server on a free loopback port (no persistence)."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server not installed: the channels_redis reference runs of this suite need it on PATH")
    server = RedisServer(executable).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=LAYER_KINDS)
def layer_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def layer_config(layer_kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The connection part of a layer's config (no per-test options):
    ``{"address": ..., "embedded": False}`` or ``{"hosts": [...], "prefix": ...}``.
    Requesting it starts the backing server (a broker, or the redis-server)."""
    if layer_kind == "dmb":
        broker = request.getfixturevalue("broker")
        return {"address": broker.address, "embedded": False}
    redis = request.getfixturevalue("redis_server")
    # A prefix per test: nothing one test leaves in Redis can reach another.
    return {"hosts": [redis.url], "prefix": f"asgi-{uuid.uuid4().hex[:8]}-"}


def build_layer(kind: str, connection: dict[str, Any], **config: Any) -> Any:
    if kind == "dmb":
        return ChannelsServerLayer(**connection, **config)
    from channels_redis.core import RedisChannelLayer

    return RedisChannelLayer(**connection, **config)


async def close_layer(kind: str, layer: Any) -> None:
    if kind == "dmb":
        await layer.close()
    else:
        await layer.close_pools()


@pytest.fixture
async def make_layer(layer_kind: str, layer_config: dict[str, Any]) -> Any:
    """``make_layer(**config)`` -> a new layer instance of this run's kind.

    ``make_layer(separate=True, ...)``: a layer with its own connection to the
    server. channels_redis instances never share connections; our layer
    instances in one process may share one when their settings are equal, so
    a separate one gets a slightly different request ``timeout`` (a setting
    the tests do not depend on). Tests check that it is."""
    made: list[Any] = []
    separate_count = 0

    def make(separate: bool = False, **config: Any) -> Any:
        nonlocal separate_count
        if separate and layer_kind == "dmb" and "timeout" not in config:
            separate_count += 1
            config["timeout"] = 5.0 + separate_count / 8
        layer = build_layer(layer_kind, layer_config, **config)
        made.append(layer)
        return layer

    yield make
    if made:
        try:
            await made[0].flush()
        finally:
            for layer in made:
                await close_layer(layer_kind, layer)


@pytest.fixture
def layer(make_layer: Callable[..., Any]) -> Any:
    """A layer with the default options."""
    return make_layer()
