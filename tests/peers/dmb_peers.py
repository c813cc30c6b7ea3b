"""pytest plugin: channels_redis's own tests, run against ``ChannelsServerLayer``.

How it works: ``tests/peers/run.py`` runs pytest on the ``tests/`` of the
channels_redis sdist with ``-p dmb_peers``. Loading this plugin (before any
test module is imported) replaces ``channels_redis.core.RedisChannelLayer``
and ``channels_redis.pubsub.RedisPubSubChannelLayer`` with adapters: our layer,
connected to one real broker (``BrokerServer`` on a free loopback port, in a
thread) that runs for the whole session. The test bodies are not changed; the
tests in ``deselected.py`` are deselected, by name.

The broker is shared by every layer the tests build, as their Redis is: the
tests' fixtures ``flush()`` it between tests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

import channels_redis.core
import channels_redis.pubsub
import pytest

from django_message_broker.layer import ChannelsServerLayer
from helpers import BrokerThread

try:
    from deselected import DESELECTED
except ImportError:  # imported as tests.peers.dmb_peers
    from .deselected import DESELECTED

#: Keyword arguments of channels_redis's layers that configure Redis itself,
#: with the reason the adapters drop them. Any other keyword goes to
#: ``ChannelsServerLayer`` unchanged (``expiry``, ``group_expiry``,
#: ``capacity``, ``channel_capacity``), and an unknown one still raises.
#: Of these, the two suites pass only ``hosts`` (and ``prefix``, in a
#: deselected test).
DROPPED_KWARGS = {
    # RedisChannelLayer and RedisPubSubChannelLayer
    "hosts": "the Redis servers (sharded over when several); the adapter connects to the test broker instead",
    "prefix": "the namespace of Redis keys; one broker per test session needs none",
    "symmetric_encryption_keys": "encrypts bodies stored in Redis; the broker keeps messages in memory only",
    "serializer_format": "channels_redis's serializer registry; our layer always uses msgpack (msgspec)",
    # RedisChannelLayer only
    "random_prefix_length": "length of channels_redis's client prefix; ours is a uuid4",
    # RedisPubSubLoopLayer, through RedisPubSubChannelLayer's **kwargs
    "on_disconnect": "redis-py pub/sub connection callback",
    "on_reconnect": "redis-py pub/sub connection callback",
    "channel_layer": "the per-event-loop layer's back reference; our layer has no per-loop objects",
}


_broker: Optional[BrokerThread] = None
#: Every layer the tests built: closed before the broker stops, so that their
#: (shared) connection does not log that it lost the broker.
_layers: list[ChannelsServerLayer] = []


def _layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    if _broker is None:
        raise RuntimeError("the test broker is not running (is the dmb_peers plugin configured?)")
    kept = {key: value for key, value in kwargs.items() if key not in DROPPED_KWARGS}
    return {**kept, "address": _broker.address, "embedded": False}


class PeerChannelLayer(ChannelsServerLayer):
    """Stands in for ``channels_redis.core.RedisChannelLayer``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_layer_kwargs(kwargs))
        _layers.append(self)


class PeerPubSubChannelLayer(ChannelsServerLayer):
    """Stands in for ``channels_redis.pubsub.RedisPubSubChannelLayer``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_layer_kwargs(kwargs))
        _layers.append(self)


# At import, so that the test modules' ``from channels_redis.core import
# RedisChannelLayer`` finds the adapter.
channels_redis.core.RedisChannelLayer = PeerChannelLayer  # type: ignore[misc]
channels_redis.pubsub.RedisPubSubChannelLayer = PeerPubSubChannelLayer  # type: ignore[misc]


def pytest_configure(config: pytest.Config) -> None:
    global _broker
    _broker = BrokerThread().start()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _broker
    for layer in _layers:
        asyncio.run(layer.close())
    _layers.clear()
    if _broker is not None:
        _broker.stop()
        _broker = None


def pytest_report_header(config: pytest.Config) -> str:
    return (
        "channels_redis's tests against django_message_broker.ChannelsServerLayer "
        f"(broker {_broker.address if _broker else '?'}, {len(DESELECTED)} tests deselected by name)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (Path(str(item.fspath)).name, getattr(item, "originalname", item.name))
        if key in DESELECTED:
            seen.add(key)
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # A name that matches nothing: the sdist renamed or removed a test.
    collected_files = {Path(str(item.fspath)).name for item in keep + drop}
    stale = sorted(key for key in DESELECTED if key[0] in collected_files and key not in seen)
    if stale:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            for file, name in stale:
                reporter.write_line(f"dmb_peers: deselected.py names {file}::{name}, which is not in this sdist")
