"""Prometheus metrics for a running broker: ``serve --metrics-port PORT``
(and ``runbroker --metrics-port``). Needs the ``metrics`` extra
(``pip install "django-message-broker[metrics]"``: ``prometheus_client``).

How it works. ``start`` serves the text exposition format on
``http://HOST:PORT/metrics`` (loopback by default) from a thread of
``prometheus_client``. On each scrape ``BrokerCollector`` asks the broker
for its detailed stats (``BrokerServer.stats(top)``, answered by the
broker's own thread, so nothing here touches its state) and turns them into
metric families: conventional names (``dmb_`` prefix, ``_total`` counters,
``_bytes``/``_seconds`` units) and a bounded cardinality: per-channel series
exist for the ``top`` deepest channels only, and the rest are summed under
``channel="__other__"``, so the sum over the label is the broker's total.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

from .exceptions import BrokerError

__all__ = ["OTHER", "BrokerCollector", "MetricsError", "MetricsServer", "require_prometheus", "start"]

logger = logging.getLogger("django_message_broker.metrics")

#: The ``channel`` label of the channels outside the top N, summed.
OTHER = "__other__"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_TOP = 20
INSTALL_HINT = 'pip install "django-message-broker[metrics]"'


class MetricsError(BrokerError):
    """The metrics endpoint cannot be served: the extra is missing, or the
    port cannot be bound."""


def require_prometheus() -> None:
    """Raise ``MetricsError`` with the install command if ``prometheus_client``
    is missing (call it before starting anything)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MetricsError(f"--metrics-port needs the 'metrics' extra (prometheus_client): {INSTALL_HINT}") from None


class BrokerCollector:
    """A ``prometheus_client`` collector over ``stats(top)``, a function
    returning the broker's detailed stats (``BrokerServer.stats``)."""

    def __init__(self, stats: Callable[[int], dict[str, Any]], top: int = DEFAULT_TOP) -> None:
        self._stats = stats
        self.top = top

    def describe(self) -> list:
        return []  # collected on demand only: no scrape at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("dmb_up", "1 if the broker answered this scrape, else 0")
        try:
            detail = self._stats(self.top)
        except Exception as exc:  # stopped, or a bug: the scrape still answers
            logger.warning("metrics: the broker did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        t = detail["totals"]

        def gauge(name: str, doc: str, value: Any) -> Any:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(value or 0))
            return family

        def counter(name: str, doc: str, value: Any) -> Any:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], float(value or 0))
            return family

        info = GaugeMetricFamily("dmb_info", "The broker's version and instance id", labels=["version", "instance"])
        info.add_metric([str(t.get("version", "")), str(t["instance"])], 1)
        yield info
        yield gauge("dmb_uptime_seconds", "Seconds since the broker started", t.get("uptime"))
        yield gauge("dmb_clients", "Connected clients", t["clients"])
        yield gauge("dmb_channels", "Channels the broker holds a queue or receivers for", t["queues"])
        yield gauge("dmb_groups", "Groups", t["groups"])
        yield gauge("dmb_group_members", "Group memberships", t["memberships"])
        yield gauge("dmb_queued_bytes", "Bytes of queued messages (body + 128 each)", t.get("queued_bytes"))
        yield gauge("dmb_max_memory_bytes", "The broker's memory limit for queued messages", t["max_memory"])
        if t.get("rss") is not None:
            yield gauge("dmb_resident_memory_bytes", "The broker process's resident memory", t["rss"])
        yield counter("dmb_messages_enqueued", "Messages queued since the broker started", t.get("enqueued"))
        yield counter("dmb_messages_delivered", "Messages delivered to receiving clients", t["delivered"])
        yield counter("dmb_messages_expired", "Messages dropped unread at their expiry", t["expired"])
        refused = CounterMetricFamily("dmb_messages_refused", "Messages refused", labels=["reason"])
        refused.add_metric(["full"], float(t["refused_full"]))
        refused.add_metric(["memory"], float(t["refused_memory"]))
        yield refused
        yield counter("dmb_received_bytes", "Bytes of message bodies received", t.get("bytes_in"))
        yield counter("dmb_commands_received", "Protocol messages received from clients", t["received"])
        yield counter("dmb_errors", "Error replies sent (bad input, refusals)", t["errors"])
        if "task_queues" in t:  # the task queues (the kombu transport), when the broker has them
            yield gauge("dmb_task_queues", "Task queues", t["task_queues"])
            yield gauge("dmb_task_messages_ready", "Task messages ready to deliver", t["task_ready"])
            yield gauge("dmb_task_messages_unacked", "Task messages delivered and not yet acked", t["task_unacked"])
            yield gauge("dmb_task_consumers", "Task queue consumers", t["task_consumers"])
            yield counter("dmb_task_unroutable", "Task messages no binding routed", t["task_unroutable"])
        per_channel = {
            "queued": GaugeMetricFamily("dmb_messages_queued", "Messages queued in a channel", labels=["channel"]),
            "held": GaugeMetricFamily(
                "dmb_messages_held", "Messages delivered to a client and not yet received there", labels=["channel"]
            ),
            "receivers": GaugeMetricFamily("dmb_channel_receivers", "Clients receiving a channel", labels=["channel"]),
        }
        other = detail.get("other_channels") or {}
        for key, family in per_channel.items():
            for row in detail["channels"]:
                family.add_metric([row["name"]], float(row[key]))
            if other.get("channels"):
                family.add_metric([OTHER], float(other[key]))
            yield family


class MetricsServer:
    """The running endpoint: ``port`` (the bound one), ``url``, ``close()``."""

    def __init__(self, httpd: Any, thread: Any, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = host
        self.port: int = httpd.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start(
    stats: Callable[[int], dict[str, Any]],
    port: int,
    host: Optional[str] = None,
    *,
    top: int = DEFAULT_TOP,
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (``port`` 0: any free one; host:
    loopback). Raises ``MetricsError`` without the extra or if the port
    cannot be bound."""
    require_prometheus()
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    host = host or DEFAULT_HOST
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(stats, top))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_open_fds, ...
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    server = MetricsServer(httpd, thread, host)
    logger.info("metrics on %s", server.url)
    return server
