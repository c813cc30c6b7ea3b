"""Celery on the same broker: a kombu transport (``dmb://``).

Use it with ``CELERY_BROKER_URL = "dmb://"`` (the broker of the project's
``CHANNEL_LAYERS``, embedded by default), ``dmb://host:port`` or
``dmb+ipc:///path``; importing this module registers the ``dmb`` scheme, and
``broker_transport = "django_message_broker.celery:Transport"`` works with
any URL. See docs/celery.md.

How it works. Unlike kombu's virtual transports, which keep exchanges,
bindings, prefetch and unacknowledged messages inside each process, this
one is a thin client: queues, exchanges (direct, topic, fanout), routing,
prefetch and acknowledgements all live in the broker (``server/tasks.py``)
and are shared by every process. A delivered message is unacknowledged in
the broker until the consumer acks it; if the consumer's connection
closes or goes silent, the broker puts it back at once. Nothing is ever
redelivered because of its age, so ETA tasks and long tasks run once.

A kombu ``Connection`` has one ``TaskConnection`` (one DEALER socket); a
kombu channel is a *session* on it, with its own prefetch and delivery
tags. The transport is event-driven: in a Celery worker, the socket's file
descriptor (and its monitor's) sit in Celery's hub; elsewhere,
``drain_events`` blocks in ``zmq_poll``. There is no polling interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import zmq
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.uuid import uuid

from .. import __version__, exceptions
from .. import protocol as p
from ._connection import ConnectionLost, TaskConnection, decode_payload, encode_payload

__all__ = ["Channel", "ConnectionLost", "Transport"]

logger = logging.getLogger("django_message_broker.celery")

TRANSPORT_ALIASES.setdefault("dmb", "django_message_broker.celery:Transport")


# kombu's code catches its ChannelError; ours carry the broker's data too.
class NotFound(exceptions.NotFound, ChannelError):
    """No such queue or exchange (AMQP's 404)."""


class ResourceLocked(exceptions.ResourceLocked, ChannelError):
    """The queue is exclusive to another connection (AMQP's 405)."""


class PreconditionFailed(exceptions.PreconditionFailed, ChannelError):
    """A declaration contradicts what exists (AMQP's 406)."""


_CHANNEL_ERRORS: dict[type, type] = {
    exceptions.NotFound: NotFound,
    exceptions.ResourceLocked: ResourceLocked,
    exceptions.PreconditionFailed: PreconditionFailed,
}
_AMQP_CODES = {NotFound: 404, ResourceLocked: 405, PreconditionFailed: 406}


def _channel_error(exc: exceptions.BrokerError) -> Exception:
    cls = _CHANNEL_ERRORS.get(type(exc))
    if cls is None:
        return exc
    err = cls(**exc.fields())
    err.code = _AMQP_CODES[cls]  # kombu's ChannelError carries AMQP's reply code
    return err


def _ttl(properties: dict) -> float:
    """AMQP's ``expiration`` property (milliseconds, as text) in seconds; 0: none."""
    expiration = properties.get("expiration")
    if expiration in (None, ""):
        return 0.0
    try:
        seconds = float(expiration) / 1000.0
    except (TypeError, ValueError):
        raise ValueError(f"message expiration must be milliseconds, not {expiration!r}") from None
    return max(seconds, 0.001)


class BrokerQoS:
    """Prefetch lives in the broker; kombu's code only reads this."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.prefetch_count = 0

    def can_consume(self) -> bool:
        return True

    def can_consume_max_estimate(self) -> int:
        return 1

    def restore_unacked_once(self, stderr: Any = None) -> None:
        pass  # the broker gives back what a closed channel held


class Message(virtual.Message):
    """A delivery: kombu's message, with the broker's delivery tag."""


class Channel(virtual.Channel):
    """A kombu channel: one session of the connection to the broker."""

    Message = Message
    QoS = BrokerQoS  # type: ignore[assignment]
    supports_fanout = True
    #: The payload is msgpack: bodies travel as bytes, no base64.
    body_encoding = None  # type: ignore[assignment]
    from_transport_options = (*virtual.Channel.from_transport_options, "confirm_publish")  # type: ignore[assignment]
    #: ``confirm_publish``: a publish returns once the broker has queued it
    #: (and raises its error); otherwise errors surface on the next call.
    confirm_publish = False

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.no_ack_consumers: set[str] = set()  # type: ignore[assignment]
        self._callbacks: dict[str, Any] = {}
        #: Callbacks of cancelled ``no_ack`` consumers: what the broker sent
        #: them before it saw the cancel has no way back, so it still reaches
        #: them (as with py-amqp until cancel-ok). A consumer that acks gets
        #: nothing after its cancel: such deliveries go back to the queue.
        self._cancelled: dict[str, Any] = {}
        self._qos_object = BrokerQoS(self)

    # -- requests --------------------------------------------------------------
    @property
    def _conn(self) -> TaskConnection:
        conn = self.connection.task_connection
        if conn is None:
            raise ConnectionLost("", "the connection is closed")
        return conn

    def _request(self, cmd: Any) -> Any:
        try:
            return self._conn.request(cmd)
        except exceptions.BrokerError as exc:
            raise _channel_error(exc) from None

    def _req(self) -> int:
        return self._conn._next_req()

    @property
    def qos(self) -> BrokerQoS:  # type: ignore[override]
        return self._qos_object

    # -- exchanges ---------------------------------------------------------------
    def exchange_declare(
        self,
        exchange: Optional[str] = None,
        type: str = "direct",
        durable: bool = False,
        auto_delete: bool = False,
        arguments: Any = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        self._request(p.ExchangeDeclare(self._req(), exchange, type, passive, durable, auto_delete))

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self._request(p.ExchangeDelete(self._req(), exchange, if_unused))

    # -- queues ------------------------------------------------------------------
    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        """``expires`` and ``message_ttl`` as AMQP's ``x-`` arguments (ms)."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue: Optional[str] = None, passive: bool = False, **kwargs: Any) -> Any:
        queue = queue or f"amq.gen-{uuid()}"
        arguments = {k: v for k, v in (kwargs.get("arguments") or {}).items() if k.startswith("x-")}
        name, ready, consumers = self._request(
            p.QueueDeclare(
                self._req(),
                queue,
                passive,
                bool(kwargs.get("durable", False)),
                bool(kwargs.get("exclusive", False)),
                bool(kwargs.get("auto_delete", False)),
                arguments,
            )
        )
        return virtual.base.queue_declare_ok_t(name, ready, consumers)

    def queue_bind(
        self, queue: str, exchange: Optional[str] = None, routing_key: str = "", arguments: Any = None, **kwargs: Any
    ) -> None:
        if not exchange:  # the default exchange routes by queue name
            return
        self._request(p.QueueBind(self._req(), queue, exchange, routing_key or ""))

    def queue_unbind(
        self, queue: str, exchange: Optional[str] = None, routing_key: str = "", arguments: Any = None, **kwargs: Any
    ) -> None:
        if not exchange:
            return
        self._request(p.QueueUnbind(self._req(), queue, exchange, routing_key or ""))

    def queue_purge(self, queue: str, **kwargs: Any) -> int:
        return int(self._request(p.QueuePurge(self._req(), queue)))

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any) -> int:
        return int(self._request(p.QueueDelete(self._req(), queue, if_unused, if_empty)))

    def _size(self, queue: str) -> int:
        return int(self.queue_declare(queue, passive=True).message_count)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        try:
            self.queue_declare(queue, passive=True)
        except NotFound:
            return False
        return True

    def after_reply_message_received(self, queue: str) -> None:
        pass  # reply queues are auto_delete with an expiry: the broker removes them

    def list_bindings(self) -> Any:
        raise NotImplementedError("the broker's bindings are not listed to clients")

    # -- publishing ---------------------------------------------------------------
    def basic_publish(self, message: dict, exchange: str, routing_key: str, **kwargs: Any) -> None:
        self._inplace_augment_message(message, exchange, routing_key)
        properties = message["properties"]
        priority = self._get_message_priority(message)
        body = encode_payload(message)
        persistent = properties.get("delivery_mode") in (2, "persistent")  # kombu's default
        cmd = p.Publish(
            self._req(),
            exchange or "",
            routing_key or "",
            priority,
            _ttl(properties),
            self.confirm_publish,
            persistent,
        )
        try:
            self._conn.publish(cmd, body)
        except exceptions.BrokerError as exc:
            raise _channel_error(exc) from None

    def _next_delivery_tag(self) -> str:
        return ""  # the broker tags each delivery

    # -- consuming ------------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: Optional[str], **kwargs: Any) -> str:
        tag = consumer_tag or uuid()
        self._callbacks[tag] = callback
        self._consumers.add(tag)
        self._tag_to_queue[tag] = queue
        if no_ack:
            self.no_ack_consumers.add(tag)
        self.connection.sessions[self.channel_id] = self
        try:
            self._request(p.Consume(self._req(), self.channel_id, queue, tag, bool(no_ack)))
        except BaseException:
            self._forget_consumer(tag)
            raise
        return tag

    def _forget_consumer(self, tag: str) -> None:
        self._callbacks.pop(tag, None)
        self._consumers.discard(tag)
        self._tag_to_queue.pop(tag, None)
        self.no_ack_consumers.discard(tag)

    def basic_cancel(self, consumer_tag: str) -> None:
        if consumer_tag not in self._consumers:
            return
        callback = self._callbacks.get(consumer_tag)
        no_ack = consumer_tag in self.no_ack_consumers
        self._forget_consumer(consumer_tag)
        if callback is not None and no_ack:
            self._cancelled[consumer_tag] = callback
            while len(self._cancelled) > 64:
                del self._cancelled[next(iter(self._cancelled))]
        conn = self.connection.task_connection
        if conn is not None and conn.lost is None:
            self._request(p.Cancel(self._req(), self.channel_id, consumer_tag))

    def deliver(self, consumer_tag: str, tag: int, redelivered: bool, body: Any) -> None:
        """A delivery for one of this channel's consumers."""
        callback = self._callbacks.get(consumer_tag) or self._cancelled.get(consumer_tag)
        if callback is None:  # not a consumer of this channel: it goes back
            self._conn.send(p.Reject(self.channel_id, [tag], True))
            return
        callback(self._message(body, tag, redelivered, consumer_tag))

    def _message(self, body: Any, tag: int, redelivered: bool, consumer_tag: str = "") -> Any:
        payload = decode_payload(body)
        properties = payload.setdefault("properties", {})
        properties["delivery_tag"] = tag
        info = properties.setdefault("delivery_info", {})
        info["redelivered"] = redelivered
        if consumer_tag:
            info["consumer_tag"] = consumer_tag
        return self.Message(payload, channel=self)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            value, body = self._conn.request_with_body(p.Get(self._req(), self.channel_id, queue, bool(no_ack)))
        except exceptions.BrokerError as exc:
            raise _channel_error(exc) from None
        if value is None or body is None:
            return None
        tag, redelivered = value
        return self._message(body, tag, redelivered)

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if multiple:
            self._conn.send(p.Ack(self.channel_id, [delivery_tag], True))
        else:
            self._conn.ack(self.channel_id, delivery_tag)

    def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self._conn.send(p.Reject(self.channel_id, [delivery_tag], bool(requeue)))

    def basic_recover(self, requeue: bool = False) -> None:
        if not requeue:
            raise NotImplementedError("recover(requeue=False) is not supported: messages go back to their queue")
        self._request(p.Recover(self._req(), self.channel_id))

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0, apply_global: bool = False) -> None:
        """Prefetch per channel (kombu's channel is the broker's session),
        whatever ``apply_global`` says."""
        self._qos_object.prefetch_count = prefetch_count
        self._request(p.Qos(self._req(), self.channel_id, int(prefetch_count)))

    def drain_events(self, timeout: Optional[float] = None, callback: Any = None) -> None:
        self.connection.drain_events(self.connection, timeout=timeout)

    def flow(self, active: bool = True) -> None:
        raise NotImplementedError("flow control is not supported")

    def close(self) -> None:
        """Cancel the consumers; the broker puts back what the channel
        holds unacknowledged."""
        if self.closed:
            return
        self.closed = True
        for tag in list(self._consumers):
            self._forget_consumer(tag)
        transport = self.connection
        if transport is not None:
            transport.sessions.pop(self.channel_id, None)
            conn = transport.task_connection
            if conn is not None and conn.lost is None and not conn.closed:
                try:
                    conn.request(p.CloseSession(conn._next_req(), self.channel_id))
                except exceptions.BrokerError:
                    pass  # the connection's own end will hand everything back
            transport.close_channel(self)
        self.exchange_types = None  # type: ignore[assignment]


def _address_of(url: str, transport_options: dict) -> tuple[Optional[str], str]:
    """(broker address or ``None`` for the project's, vhost) of a ``dmb`` URL."""
    if "://" not in url:
        url = "dmb://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    vhost = unquote(parts.path.lstrip("/")) if scheme in ("dmb", "tcp", "dmb+tcp") else ""
    vhost = transport_options.get("vhost", vhost or "/")
    if scheme == "ipc" or scheme.endswith("+ipc"):
        return "ipc://" + url.split("://", 1)[1], vhost
    if not parts.hostname:
        return None, vhost
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{parts.port or 5556}", vhost


class Transport(virtual.Transport):
    """kombu's transport for django-message-broker (``dmb://``)."""

    Channel = Channel
    driver_type = "dmb"
    driver_name = "django-message-broker"
    can_parse_url = True
    default_port = 5556  # type: ignore[assignment]
    polling_interval = None  # type: ignore[assignment]

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = (  # type: ignore[assignment]
        ConnectionLost,
        exceptions.BrokerUnavailable,
        exceptions.ClientClosed,
        zmq.ZMQError,
        OSError,
    )
    channel_errors = (  # type: ignore[assignment]
        ChannelError,
        exceptions.QueueFull,
        exceptions.MessageTooLarge,
        exceptions.ProtocolError,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.task_connection: Optional[TaskConnection] = None
        #: channel id -> the channel that consumes (deliveries are routed by session)
        self.sessions: dict[int, Channel] = {}
        #: Celery's hub, once registered with it.
        self._hub: Any = None

    def driver_version(self) -> str:
        return __version__

    # -- connecting -------------------------------------------------------------
    def establish_connection(self) -> Transport:
        client: Any = self.client
        address, vhost = _address_of(client.hostname or "", client.transport_options or {})
        options = _client_options(address)
        timeout = float(client.connect_timeout or options.timeout)
        if options.embedded:
            from ..embedded import ensure_broker

            try:
                ensure_broker(
                    options.address,
                    idle_timeout=options.embedded_idle_timeout,
                    max_body=options.max_message_size,
                    max_memory=options.embedded_max_memory,
                )
            except RuntimeError as exc:
                raise ConnectionLost(options.address, str(exc)) from None
        from ..keys import client_curve

        conn = TaskConnection(
            options.address, vhost=vhost, timeout=timeout, curve=client_curve(options.server_key, options.client_key)
        )
        try:
            conn.open()
        except BaseException:
            conn.close()
            raise
        self.task_connection = conn
        return super().establish_connection()  # type: ignore[no-any-return]

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)
        finally:
            conn, self.task_connection = self.task_connection, None
            self.sessions.clear()
            if conn is not None:
                conn.close()

    def verify_connection(self, connection: Any) -> bool:
        conn = self.task_connection
        return conn is not None and conn.lost is None

    # -- receiving ------------------------------------------------------------------
    def _deliver_one(self, received: tuple) -> None:
        session, consumer, tag, redelivered, body = received
        channel = self.sessions.get(session)
        if channel is None or channel.closed:
            assert self.task_connection is not None
            self.task_connection.send(p.Reject(session, [tag], True))
            return
        channel.deliver(consumer, tag, redelivered, body)

    def drain_events(self, connection: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:
        """Deliver what has arrived; wait up to ``timeout`` for something
        (``socket.timeout`` if nothing came)."""
        conn = self.task_connection
        if conn is None:
            raise ConnectionLost("", "the connection is closed")
        conn.flush()
        conn.raise_deferred()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not conn.pending:
            conn.read()
        while not conn.pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError()  # socket.timeout: what kombu expects
            conn.wait_readable(left)
            conn.read()
        conn.dispatch(self._deliver_one)
        conn.flush()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        conn = self.task_connection
        assert conn is not None
        self._hub = loop
        loop.add_reader(conn.fileno(), self.on_readable, connection, loop)
        loop.add_reader(conn.monitor_fileno(), self.on_readable, connection, loop)
        loop.on_tick.add(self._on_tick)
        # Deliveries may have come with the replies of the consumer's setup.
        loop.call_soon(self._on_tick)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        conn = self.task_connection
        if conn is not None:
            loop.remove_reader(conn.fileno())
            loop.remove_reader(conn.monitor_fileno())
        loop.on_tick.discard(self._on_tick)
        self._hub = None

    def on_readable(self, connection: Any, loop: Any) -> None:
        """Celery's hub: the socket (or its monitor) is readable. Raises
        ``ConnectionLost`` into the hub, which ends the consumer: Celery
        reconnects."""
        conn = self.task_connection
        if conn is None:
            return
        conn.read()
        conn.dispatch(self._deliver_one)
        conn.flush()

    def _on_tick(self) -> None:
        """Once per turn of Celery's hub, before it sleeps: deliveries that
        came while a request waited for its reply, and whatever is ready on
        the socket. A send (an ack, a publish) lets ZeroMQ take in arrived
        messages and reset the edge-triggered descriptor without a wake, so
        the hub must look before each sleep, not only when woken.

        The hub's other tick callbacks run in no set order; the prefork
        pool's registers a writer for each job waiting to go to a pool
        process. If it ran before this one, the jobs these deliveries made
        would wait for its next turn, which may be the pool's 5 s timer: so
        after delivering, the others run again."""
        conn = self.task_connection
        if conn is None:
            return
        delivered = 0
        while True:
            if conn.readable():
                conn.read()
            if conn.pending:
                delivered += conn.dispatch(self._deliver_one)
            conn.flush()
            conn.raise_deferred()
            # What the consumers sent (acks, publishes) may have taken the
            # descriptor's edge for a delivery that came meanwhile: the hub
            # would sleep over it. Prefetch bounds the rounds.
            if not conn.pending and not conn.readable():
                break
        hub = self._hub
        if delivered and hub is not None:
            for callback in list(hub.on_tick):
                if callback != self._on_tick:
                    callback()

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": ""}


def _client_options(address: Optional[str]) -> Any:
    """The connection's options: the project's ``CHANNEL_LAYERS`` broker
    for ``dmb://`` (the embedded one by default), else ``address`` (never
    embedded)."""
    from ..options import LayerOptions

    if address is None:
        config = _settings_layer_config()
        return LayerOptions.from_config(config, "CELERY_BROKER_URL 'dmb://' (CHANNEL_LAYERS)").client
    # A URL that names a broker means a broker someone runs: never start an
    # embedded one there (it would hold the address, in memory only, while
    # the real one restarts with its durable queues).
    return LayerOptions.from_config({"address": address, "embedded": False}, "the dmb:// URL").client


def _settings_layer_config() -> dict[str, Any]:
    """``CHANNEL_LAYERS["default"]["CONFIG"]`` if that layer is ours, else {}."""
    try:
        from django.conf import settings

        layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    except Exception:  # Django missing or not configured: the defaults
        return {}
    layer = layers.get("default") or {}
    backend = str(layer.get("BACKEND", ""))
    if not backend.startswith("django_message_broker"):
        return {}
    return dict(layer.get("CONFIG") or {})
