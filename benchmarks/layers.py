"""The layer factories: which layers a run compares, and how each is built.

A factory turns the run's servers (``Servers``) into a picklable spec
(``{"path": "module.Class", "kwargs": {...}}``) that every worker process
builds its own layer from. ``server`` names the process whose CPU time and
memory belong to that layer. ``scenarios`` lists where the layer makes
sense; elsewhere its cell reads "n/a".

Add a layer: append a ``LayerFactory`` to ``FACTORIES``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

#: Capacity for every layer, far above what any scenario queues, so that
#: ChannelFull never interferes.
CAPACITY = 100_000
EXPIRY = 120

CROSS = ("throughput", "rtt", "group", "large", "cpu")


@dataclass
class Servers:
    redis_port: Optional[int] = None
    broker_address: Optional[str] = None
    relay_address: Optional[str] = None


@dataclass(frozen=True)
class LayerFactory:
    name: str
    label: str
    path: str
    kwargs: Callable[[Servers], dict]
    server: Optional[str]  # "broker", "redis", "relay" or None (in-process)
    scenarios: tuple[str, ...]
    note: str = ""
    needs: tuple[str, ...] = field(default_factory=tuple)

    def spec(self, servers: Servers, **overrides: object) -> dict:
        kwargs = self.kwargs(servers)
        kwargs.update(overrides)
        return {"name": self.name, "path": self.path, "kwargs": kwargs}

    def available(self) -> Optional[str]:
        """None if the layer can run here, else the reason it cannot."""
        module = self.path.rpartition(".")[0]
        try:
            found = importlib.util.find_spec(module)
        except ImportError as exc:
            return f"{module} cannot be imported: {exc}"
        if found is None:
            return f"{module} is not installed (or not written yet)"
        return None

    def supports(self, scenario: str) -> bool:
        return scenario in self.scenarios


def _redis_hosts(servers: Servers) -> list:
    return [("127.0.0.1", servers.redis_port)]


FACTORIES: list[LayerFactory] = [
    LayerFactory(
        name="ours",
        label="ours (ChannelsServerLayer)",
        path="django_message_broker.layer.ChannelsServerLayer",
        kwargs=lambda s: {
            "address": s.broker_address,
            "embedded": False,
            "capacity": CAPACITY,
            "expiry": EXPIRY,
            "group_expiry": 86400,
        },
        server="broker",
        scenarios=(*CROSS, "sync_send", "memory", "local"),
        needs=("broker",),
    ),
    LayerFactory(
        name="redis",
        label="channels_redis RedisChannelLayer",
        path="channels_redis.core.RedisChannelLayer",
        kwargs=lambda s: {"hosts": _redis_hosts(s), "capacity": CAPACITY, "expiry": EXPIRY, "group_expiry": 86400},
        server="redis",
        scenarios=(*CROSS, "sync_send", "memory", "local"),
        needs=("redis",),
    ),
    LayerFactory(
        name="pubsub",
        label="channels_redis RedisPubSubChannelLayer",
        path="channels_redis.pubsub.RedisPubSubChannelLayer",
        kwargs=lambda s: {"hosts": _redis_hosts(s)},
        server="redis",
        # No queue on the server: sync_send (send first, receive later) and
        # memory (messages nobody receives) do not apply.
        scenarios=(*CROSS, "local"),
        note="no server-side queue: a message sent while nobody is subscribed is dropped",
        needs=("redis",),
    ),
    LayerFactory(
        name="inmemory",
        label="channels InMemoryChannelLayer",
        path="channels.layers.InMemoryChannelLayer",
        kwargs=lambda s: {"capacity": CAPACITY, "expiry": EXPIRY},
        server=None,
        scenarios=("sync_send", "local"),
        note="one process only",
    ),
    LayerFactory(
        name="zmq",
        label="bare pyzmq relay (floor)",
        path="benchmarks.zmq_floor.ZmqFloorLayer",
        kwargs=lambda s: {"address": s.relay_address},
        server="relay",
        scenarios=("throughput", "rtt", "large", "cpu"),
        note="ROUTER relay + DEALER clients, msgpack, no queue/ack/credit: the floor",
        needs=("relay",),
    ),
]

BY_NAME = {f.name: f for f in FACTORIES}
#: The reference every ratio is taken against.
REFERENCE = "redis"
OURS = "ours"
