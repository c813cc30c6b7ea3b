"""One connection to the broker's task queues, for the kombu transport.

How it works. A DEALER socket owned by whoever drives the kombu connection
(Celery's hub, or a thread calling ``drain_events``): no I/O thread, no
event loop of its own. Requests (declare, bind, consume...) are sent and
their ``Reply`` awaited on the same socket; deliveries that arrive in the
meantime wait in ``pending`` for the next ``dispatch``. Acks are buffered
and leave with the next request, tick or drain (``flush``), in one message.

ZeroMQ's file descriptor is edge-triggered: it signals a change of
``zmq.EVENTS``, not readable data. ``read`` therefore takes every ready
frame until ``zmq.Again`` and checks ``EVENTS`` once more before
returning, so nothing is stranded until the next wake.

Liveness is the connection's. The broker hands a dead process's
unacknowledged messages back when its connection closes (it notices at
once) or when ZeroMQ's heartbeats stop (a vanished host). This side runs
ZeroMQ heartbeats too, and watches its socket's events: the connection
dropping, or a broker that no longer knows us (``Welcome``: it restarted),
raises ``ConnectionLost`` within ``_ZMTP_HEARTBEAT_TIMEOUT`` of the loss,
so that Celery reconnects and consumes again.

Fork: a connection made in another process (the parent) is never used or
closed here: ``close`` only forgets it (pyzmq does not close sockets it did
not make in this process either).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from typing import Any, Callable, Optional

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import protocol as p
from .._process import hello_fields
from ..exceptions import BrokerError, BrokerUnavailable, MessageTooLarge, from_wire
from ..options import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ["ConnectionLost", "TaskConnection"]

#: ms: the broker is pinged this often and declared lost after the timeout.
_ZMTP_HEARTBEAT_IVL = 500
_ZMTP_HEARTBEAT_TIMEOUT = 1500
#: Commands sent without waiting for a reply, at most, before a ``Sync``.
MAX_AHEAD = 1000
#: ms libzmq keeps sending after a close whose Sync was not answered.
_CLOSE_LINGER_MS = 10_000
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_MONITOR_EVENTS = int(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

_contexts: dict[int, zmq.Context] = {}


def _context() -> zmq.Context:
    """One ZeroMQ context per process (a context must not cross a fork)."""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        ctx = _contexts[pid] = zmq.Context()
    return ctx


class ConnectionLost(BrokerError, ConnectionError):
    """The connection to the broker dropped, or the broker restarted and
    forgot it. kombu's ``connection_errors`` include it: Celery reconnects."""

    code = 98

    def __init__(self, address: str = "", reason: str = "the connection was lost") -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason


#: One task message as received: (session, consumer tag, delivery tag, redelivered, body).
Received = tuple[int, str, int, bool, Any]


class TaskConnection:
    def __init__(
        self,
        address: str,
        *,
        vhost: str = "/",
        timeout: float = 5.0,
        curve: Optional[tuple[bytes, bytes, bytes]] = None,
    ) -> None:
        self.address = address
        self.vhost = vhost
        self.timeout = timeout
        self.pid = os.getpid()
        self.client_id = "kombu-" + uuid.uuid4().hex
        self.max_body = DEFAULT_MAX_MESSAGE_SIZE  # replaced by the broker's limit at connect
        self.pending: deque[Received] = deque()
        self.lost: Optional[ConnectionLost] = None
        self.closed = False
        self._acks: dict[int, list[int]] = {}
        self._dispatching = False
        #: Acks or unconfirmed publishes were sent since the last reply:
        #: ``close`` sends a ``Sync`` first, so that none of them is lost in
        #: the socket (closed with no linger) and, with a durable store, all
        #: are on disk.
        self.unsynced = False
        #: Commands sent without a reply since the last reply (``send``).
        self._ahead = 0
        self._req = 0
        #: errors of requests nobody waits for (unconfirmed publishes), raised by the next call
        self._deferred: deque[BrokerError] = deque()
        self._waiting: Optional[int] = None
        self._reply: Optional[p.Reply] = None
        self._reply_body: Any = None
        ctx = _context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.client_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # a send fails at once while not connected
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_IVL)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_HEARTBEAT_TIMEOUT)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
        self.sock = sock
        self.monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        self._connected_once = False
        sock.connect(address)

    # -- setup ------------------------------------------------------------------
    def open(self) -> None:
        """Say Hello (no heartbeats: liveness is the connection's) and open
        the vhost; ``BrokerUnavailable`` if no broker answers in time."""
        deadline = time.monotonic() + self.timeout
        while True:  # IMMEDIATE: sends fail until the connection is up
            try:
                hello = p.Hello(self._next_req(), self.client_id, 0.0, **hello_fields())
                self.sock.send(p.encode(hello), _NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(self.address, self.timeout) from None
                self._check_monitor()
                if self.lost is not None:
                    raise self.lost from None
                self.sock.poll(20, zmq.POLLOUT)
        value = self._wait(self._req, deadline)
        self.max_body = int(value[1])
        self._connected_once = True
        self.request(p.Open(self._next_req(), self.vhost))

    # -- sending ----------------------------------------------------------------
    def _next_req(self) -> int:
        self._req = (self._req + 1) & 0x7FFFFFFF or 1
        return self._req

    def _send(self, frames: list[Any]) -> None:
        if self.lost is not None:
            raise self.lost
        try:
            self.sock.send_multipart(frames, _NOBLOCK)
        except zmq.Again:
            self._lose("not connected to the broker")
            raise self.lost from None  # type: ignore[misc]
        except zmq.ZMQError as exc:
            self._lose(f"send failed: {exc}")
            raise self.lost from None  # type: ignore[misc]

    def request(self, cmd: Any, body: Any = None, *, timeout: Optional[float] = None) -> Any:
        """Send ``cmd`` (with its ``req``) and return the reply's value;
        raises the broker's error, ``ConnectionLost`` or
        ``BrokerUnavailable`` (no answer in ``timeout``)."""
        self.flush()
        self._send([p.encode(cmd)] if body is None else [p.encode(cmd), body])
        return self._wait(cmd.req, time.monotonic() + (self.timeout if timeout is None else timeout))

    def request_with_body(self, cmd: Any) -> tuple[Any, Any]:
        """``request`` for a command whose reply may carry a body (``Get``)."""
        value = self.request(cmd)
        body, self._reply_body = self._reply_body, None
        return value, body

    def send(self, cmd: Any, body: Any = None) -> None:
        """Send a command that is answered only on error (an unconfirmed
        publish, a reject); the error is raised by a later publish or drain.

        Every ``MAX_AHEAD`` of them in a row, wait for a ``Sync``: a
        publisher without confirms then runs at most that far ahead of the
        broker (and of its disk, for durable queues), so a backlog built
        faster than the broker takes it waits in the publisher, not in
        the broker's memory."""
        self.unsynced = True
        self._send([p.encode(cmd)] if body is None else [p.encode(cmd), body])
        self._ahead += 1
        if self._ahead >= MAX_AHEAD:
            self.request(p.Sync(self._next_req()))

    def publish(self, cmd: p.Publish, body: bytes) -> Any:
        if len(body) > self.max_body:
            raise MessageTooLarge(len(body), self.max_body)
        if cmd.confirm:
            return self.request(cmd, body)
        self.raise_deferred()
        self.flush()
        self.send(cmd, body)
        return None

    def ack(self, session: int, tag: int) -> None:
        """Sent at once, or, while ``dispatch`` hands out a batch, with the
        batch's other acks when it ends."""
        acks = self._acks.get(session)
        if acks is None:
            self._acks[session] = [tag]
        else:
            acks.append(tag)
        if not self._dispatching or len(acks or ()) >= 256:
            self.flush()

    def flush(self) -> None:
        """Send the buffered acks."""
        if not self._acks or self.lost is not None:
            return
        acks, self._acks = self._acks, {}
        for session, tags in acks.items():
            self._send([p.encode(p.Ack(session, tags))])
        self.unsynced = True

    def raise_deferred(self) -> None:
        if self.lost is not None:
            raise self.lost
        if self._deferred:
            raise self._deferred.popleft()

    # -- receiving ----------------------------------------------------------------
    def _wait(self, req: int, deadline: float) -> Any:
        self._waiting, self._reply = req, None
        try:
            while self._reply is None:
                self.read()
                if self._reply is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._lose(f"no answer within {self.timeout:g}s")
                    raise BrokerUnavailable(self.address, self.timeout)
                zmq.zmq_poll([(self.sock, _POLLIN), (self.monitor, _POLLIN)], max(1, int(min(left, 0.25) * 1000)))
            reply = self._reply
            self._ahead = 0  # the broker has read everything sent before
        finally:
            self._waiting = None
        if reply.code:
            raise from_wire(reply.code, reply.detail, reply.value)
        return reply.value

    def read(self) -> int:
        """Take every frame that is ready (deliveries to ``pending``);
        returns how many deliveries came. Raises ``ConnectionLost``."""
        sock = self.sock
        if self.monitor.getsockopt(zmq.EVENTS) & _POLLIN:  # cheaper than a recv that fails
            self._check_monitor()
        # Copied (bytes): a body is copied once either way, and a zmq.Frame
        # per frame costs more than the copy of a task message.
        recv = sock.recv_multipart
        count = 0
        while True:
            try:
                frames = recv(_NOBLOCK)
            except zmq.Again:
                if not sock.getsockopt(zmq.EVENTS) & _POLLIN:  # edge-triggered: look once more
                    break
                continue
            count += self._on_message(frames)
        if self.lost is not None:
            raise self.lost
        return count

    def _on_message(self, frames: list) -> int:
        try:
            msg = p.decode_to_client(frames[0])
        except p.ProtocolError:
            return 0  # never from our broker; nothing to do but drop it
        if type(msg) is p.TaskDeliver:
            bodies = frames[1:]
            if len(bodies) != len(msg.tags):
                return 0
            pending = self.pending
            for i, body in enumerate(bodies):
                pending.append((msg.sessions[i], msg.consumers[i], msg.tags[i], msg.redelivered[i], body))
            return len(bodies)
        if type(msg) is p.Reply:
            if msg.req == self._waiting:
                self._reply = msg
                self._reply_body = frames[1] if len(frames) > 1 else None
            elif msg.code:
                self._deferred.append(from_wire(msg.code, msg.detail, msg.value))
        elif type(msg) is p.Welcome and self._connected_once:
            self._lose("the broker restarted and no longer knows this connection")
        return 0

    def _check_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, _NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lose("the connection to the broker closed")
            else:
                self._lose("the broker refused this client's CURVE handshake")

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = ConnectionLost(self.address, reason)

    def dispatch(self, deliver: Callable[[Received], None]) -> int:
        """Hand the pending deliveries to ``deliver``, oldest first."""
        pending = self.pending
        count = 0
        self._dispatching = True
        try:
            while pending:
                deliver(pending.popleft())
                count += 1
        finally:
            self._dispatching = False
        self.flush()
        return count

    def readable(self) -> bool:
        """Something waits to be read (or the monitor has news)."""
        return bool(self.sock.getsockopt(zmq.EVENTS) & _POLLIN or self.monitor.getsockopt(zmq.EVENTS) & _POLLIN)

    def wait_readable(self, timeout: Optional[float]) -> None:
        """Block until the socket or its monitor has something (or ``timeout``)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        zmq.zmq_poll([(self.sock, _POLLIN), (self.monitor, _POLLIN)], ms)

    # -- file descriptors for Celery's hub --------------------------------------------
    def fileno(self) -> int:
        return int(self.sock.getsockopt(zmq.FD))

    def monitor_fileno(self) -> int:
        return int(self.monitor.getsockopt(zmq.FD))

    # -- closing -------------------------------------------------------------------
    def close(self) -> None:
        """Say goodbye (the broker hands back what this connection still
        holds at once) and close. In a forked child: only forget it."""
        if self.closed:
            return
        self.closed = True
        if self.pid != os.getpid():
            return
        if self.lost is None:
            try:
                self.flush()
                if self.unsynced:  # what we sent has arrived (and, with a durable store, is on disk)
                    self.request(p.Sync(self._next_req()))
                self.sock.send(p.encode(p.Bye()), _NOBLOCK)
            except (BrokerError, zmq.ZMQError):
                # Not confirmed in time: let libzmq go on sending what is
                # queued for a while after the close, rather than drop it.
                self.sock.setsockopt(zmq.LINGER, _CLOSE_LINGER_MS)
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)


def encode_payload(payload: dict) -> bytes:
    return _encoder.encode(payload)


def decode_payload(body: Any) -> dict:
    return _decoder.decode(body)  # type: ignore[no-any-return]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
