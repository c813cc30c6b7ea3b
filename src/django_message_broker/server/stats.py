"""What the broker tells about itself: the detailed form of ``Stats``.

How it works. The hot path only adds to plain ints: each ``ChannelQueue``
counts what it enqueued (messages and bytes), delivered, expired and
refused; the broker counts its own totals. Nothing here runs per message.
``RateHistory`` is a small ring of broker-wide totals, one sample per
``Broker.sweep`` (about once a second): rates are differences between
samples, so no message carries a timestamp. ``detailed_stats`` builds the
answer to ``Stats(top=N)``: the flat counters plus rates, uptime, RSS and
version (``totals``), the ``N`` deepest channels (the rest summed in
``other_channels``), the ``N`` clients holding most, and the rate history.
Its size is bounded by ``MAX_TOP`` and ``HISTORY`` whatever the broker
holds. Pure: no I/O (RSS comes from a function the shell gives).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..exceptions import ProtocolError

if TYPE_CHECKING:
    from .broker import Broker, ClientState
    from .server_queue import ChannelQueue

__all__ = ["HISTORY", "MAX_TOP", "BrokerStatistics", "RateHistory", "check_top", "detailed_stats"]

#: Most channels (and clients) one detailed answer lists.
MAX_TOP = 1000
#: Samples of per-second totals kept (five minutes at one a second).
HISTORY = 300
#: What a channel row says, in order; ``other_channels`` sums the same.
CHANNEL_FIELDS = ("queued", "held", "receivers", "enqueued", "delivered", "expired", "refused_full")


def check_top(top: Any) -> int:
    """``Stats.top``: 0 (the flat dict) or how many channels to list;
    more than ``MAX_TOP`` lists ``MAX_TOP``. Raises ``ProtocolError``."""
    if type(top) is not int or top < 0:
        raise ProtocolError(f"Stats top must be an int >= 0, not {top!r}")
    return min(top, MAX_TOP)


class RateHistory:
    """A ring of (time, messages enqueued, messages delivered, body bytes
    received) totals, cumulative, one per ``sample``; rates are differences."""

    def __init__(self, size: int = HISTORY) -> None:
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=size + 1)

    def sample(self, now: float, messages_in: int, delivered: int, bytes_in: int) -> None:
        samples = self._samples
        if samples and now <= samples[-1][0]:
            return  # time did not move: a rate would divide by zero
        samples.append((now, messages_in, delivered, bytes_in))

    def rates(self) -> dict[str, list[float]]:
        """Per-second rates between consecutive samples, oldest first
        (``seconds``: how long ago each interval ended, from the last one)."""
        out: dict[str, list[float]] = {"seconds": [], "messages_in": [], "delivered": [], "bytes_in": []}
        samples = list(self._samples)
        if not samples:
            return out
        last = samples[-1][0]
        for (t0, i0, d0, b0), (t1, i1, d1, b1) in itertools.pairwise(samples):
            dt = t1 - t0
            out["seconds"].append(round(last - t1, 3))
            out["messages_in"].append(max(i1 - i0, 0) / dt)
            out["delivered"].append(max(d1 - d0, 0) / dt)
            out["bytes_in"].append(max(b1 - b0, 0) / dt)
        return out

    def latest(self) -> dict[str, float]:
        """The rates of the last interval (zeros before two samples)."""
        rates = self.rates()
        return {key: (values[-1] if values else 0.0) for key, values in rates.items() if key != "seconds"}


class BrokerStatistics:
    """The broker's own stats state: ``version``, ``rss`` (a function the
    shell gives: the process's resident bytes, or None), when it
    ``started``, the rate ``history``, the ``enqueued`` counts of queues it
    forgot, and the body bytes received (``bytes_in``)."""

    __slots__ = ("bytes_in", "history", "retired_enqueued", "rss", "started", "version")

    def __init__(self, version: str, rss: Optional[Callable[[], Optional[int]]], started: float) -> None:
        self.version = version
        self.rss = rss
        self.started = started
        self.history = RateHistory()
        self.retired_enqueued = 0
        self.bytes_in = 0


def _channel_row(queue: ChannelQueue) -> dict[str, Any]:
    return {
        "name": queue.name,
        "queued": len(queue.queue),
        "held": queue.held,
        "receivers": len(queue.subscribers),
        "enqueued": queue.enqueued,
        "delivered": queue.delivered,
        "expired": queue.expired,
        "refused_full": queue.refused_full,
    }


def _client_row(client: ClientState, now: float) -> dict[str, Any]:
    credit = held = 0
    for endpoint in client.endpoints.values():
        credit += endpoint.credit or 0
        held += endpoint.held
    return {
        "id": client.client_id or client.ident.hex(),
        "host": client.host,
        "pid": client.pid,
        "name": client.name,
        "connected": round(now - client.connected_at, 3),
        "channels": len(client.endpoints),
        "credit": credit,
        "held": held,
    }


def detailed_stats(broker: Broker, top: int, now: float) -> dict[str, Any]:
    """The answer to ``Stats(top)`` with ``top > 0`` (see the module's doc)."""
    statistics = broker.statistics
    queues = broker.queues.values()
    deepest = heapq.nlargest(top, queues, key=lambda q: q.depth)
    rows = [_channel_row(q) for q in deepest]
    # The others' sums: everything minus the rows shown (no row per queue:
    # a broker with 100,000 channels answers in a few milliseconds).
    queued = held = receivers = enqueued = delivered = expired = refused = 0
    for q in queues:
        queued += len(q.queue)
        held += q.held
        receivers += len(q.subscribers)
        enqueued += q.enqueued
        delivered += q.delivered
        expired += q.expired
        refused += q.refused_full
    everything = (queued, held, receivers, enqueued, delivered, expired, refused)
    other: dict[str, Any] = {"channels": len(broker.queues) - len(rows)}
    for key, total in zip(CHANNEL_FIELDS, everything, strict=True):
        other[key] = total - sum(row[key] for row in rows)
    clients = [_client_row(c, now) for c in broker.clients.values()]
    clients = heapq.nlargest(top, clients, key=lambda row: (row["held"], row["credit"]))
    totals = {
        **broker.stats(),
        "enqueued": broker.enqueued_total(),
        "bytes_in": statistics.bytes_in,
        "queued_bytes": broker.memory.used,
        "uptime": round(now - statistics.started, 3),
        "rss": statistics.rss() if statistics.rss is not None else None,
        "version": statistics.version,
        "rates": statistics.history.latest(),
    }
    return {
        "top": top,
        "totals": totals,
        "channels": rows,
        "other_channels": other,
        "clients": clients,
        "other_clients": len(broker.clients) - len(clients),
        "history": statistics.history.rates(),
    }
