"""The client's driver: one I/O thread owns one DEALER socket.

How it works. The rules live in the pure ``client._state.ClientState``
(receive buffers, credit, hand-offs, consumption reports, idle withdrawal,
restart replay, the send window); ``Core`` owns the socket, the I/O thread,
the lock and the waiters' scheduling. It calls the state with the lock held
and the time as ``now``, and sends the messages the state returns.

Callers on any thread or event loop never touch the socket. They hand the
I/O thread a command (a deque and a wake-up pipe) and wait on a *waiter*
(``client.waiters``): an asyncio future on their own loop or a blocking
slot. The thread sends, reads every frame that is ready, feeds the state
(which resolves waiters; one ``call_soon_threadsafe`` per loop per batch)
and keeps the clock: heartbeats, request timeouts, idle receive credit.
A receive on an event loop settles its hand-off there (``settled``), where
cancellation happens.

What receives took is reported to the broker (one ``Consumed`` per wake)
before anything else is sent, so a send made after a receive in this
process is checked against what the broker knows the receive took.

Sending is pipelined while the send window allows (``_state.SendWindow``):
a sender far below capacity pays no round trip per message, and one near
capacity waits for the broker's answer, so ``QueueFull`` is exact for a
single sender. Consecutive pipelined sends to one channel are packed into
one ``Send`` with many bodies.

Restarts: every reply names the broker instance. A new instance means the
broker restarted, a ``Welcome`` that it does not know this client (a new
broker, or one that dropped us): the client says Hello again and sends what
``ClientState.connected`` returns (credit for waiting receives, and after a
restart the group memberships that have not expired).

Security (docs/security.md): with a server key the DEALER is a CURVE
client. A refused handshake shows on the socket monitor; every pending
request and waiting receive then fails with ``AuthenticationFailed``, and so
does every later call until a handshake succeeds (the socket reconnects
every ``_AUTH_RETRY`` seconds to find out).

Fork safety: a core made before ``fork()`` belongs to the parent
(``Core.inherited``); the child neither uses nor closes it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Optional

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import protocol as p
from .._process import hello_fields
from ..exceptions import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnavailable,
    ClientClosed,
    QueueFull,
    SubscriptionError,
    from_wire,
)
from ..keys import client_curve
from ..options import ClientOptions
from . import _lifecycle
from ._handshake import Handshake
from ._requests import Requests
from ._state import ChannelState, ClientState, Item, Shared, W, share_bodies
from .waiters import AsyncWaiter, LoggingWaiter, SyncWaiter, Waiter

__all__ = ["AsyncWaiter", "Core", "SyncWaiter"]

logger = logging.getLogger("django_message_broker.client")

_CONNECT_PROBE = 0.5  # seconds to wait for a first answer before starting an embedded broker
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)
_ZERO_COPY_THRESHOLD = 65536  # smaller frames are copied: cheaper than zero-copy bookkeeping
_PACK_BYTES = 4 << 20  # at most this much body in one packed Send
_SCAN_INTERVAL = 0.02
_MAX_BACKLOG = 10_000  # messages waiting for a connection; past it the oldest is dropped
_CLOSE_LINGER_MS = 1000  # how long close() lets queued messages drain
# --- CURVE (docs/security.md) ---
_AUTH_RETRY = 5.0  # seconds between new handshakes after a refusal (libzmq does not retry by itself)
_FAILURES: dict[int, str] = {
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol",
}
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

_D = ClientOptions()  # the defaults; the clients check the values


class Core:
    """The driver: owns the DEALER socket, the I/O thread and the lock, and
    feeds the pure ``ClientState`` (``self.state``), sending what it returns.
    Thread-safe entry points: ``call``, ``request``, ``post``,
    ``send_pipelined``, ``may_pipeline``, ``acked``, ``refused``, ``take``,
    ``put_back``, ``forget_waiter``, ``remember_group``, ``forget_group``,
    ``close``."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = _D.timeout,
        heartbeat: float = _D.heartbeat,
        prefetch: int = _D.prefetch,
        process_prefetch: int = _D.process_prefetch,
        idle_return: float = _D.idle_return,
        max_message_size: int = _D.max_message_size,
        on_unreachable: Optional[Callable[[str], None]] = None,
        server_key: Any = None,
        client_key: Any = None,
    ) -> None:
        self.address = address
        # --- CURVE: keys are read here, so a bad file fails the constructor.
        self._curve = client_curve(server_key, client_key)
        self._handshake = Handshake(address, self._curve is not None)
        self.timeout = timeout
        self.heartbeat = heartbeat
        #: Receive buffers, credit, consumption, groups and the send window;
        #: touched only with ``lock`` held.
        self.state = ClientState(prefetch=prefetch, process_prefetch=process_prefetch, idle_return=idle_return)
        self.on_unreachable = on_unreachable
        self.client_id = uuid.uuid4().hex
        self.max_body = max_message_size  # the broker's limit, once its Hello reply tells
        self.instance: Optional[str] = None
        self.connected = False
        self.closed = False

        self.lock = threading.RLock()
        self._commands: deque[Any] = deque()  # callables, or pipelined sends as tuples
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_pending = False
        self._requests = Requests(_MAX_BACKLOG)
        #: loop -> [(waiter, value, error)] to settle there this batch
        self._calls: dict[Any, list[tuple[AsyncWaiter, Any, Optional[BaseException]]]] = {}
        self._last_heard = 0.0
        self._last_hello = 0.0
        self._heartbeat_req = 0
        self._next_scan = 0.0  # timeouts and liveness are checked every _SCAN_INTERVAL
        #: Idle channels are looked for every tenth of ``idle_return`` (a
        #: scan visits every channel: 5,000 channels every 20 ms cost 3% of
        #: a receiving process).
        self._idle_scan_interval = max(_SCAN_INTERVAL, idle_return / 10)
        self._next_idle_scan = 0.0
        self._unreachable_reported = False
        self._ready = threading.Event()
        self._context = zmq.Context()
        self._socket = self._new_socket()
        self._thread = threading.Thread(target=self._run, name=f"dmb-client-{self.client_id[:8]}", daemon=True)
        self.generation = _lifecycle.generation()
        self._thread.start()
        _lifecycle.track(self)

    @property
    def inherited(self) -> bool:
        """Made by the parent of this (forked) process: not ours to use."""
        return self.generation != _lifecycle.generation()

    # ------------------------------------------------------------------ setup
    def _new_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.client_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue on a connection that is not up
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        # ZeroMQ reconnects by itself; its monitor tells us when, so that a
        # restarted broker hears Hello at once rather than at our next
        # heartbeat. The handshake events turn a refused key into
        # AuthenticationFailed at once rather than a timeout. The monitor is
        # attached before connect: a refusal on loopback takes ~1 ms, and
        # libzmq does not retry it, so a later monitor could miss the only one.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_EVENTS)
        sock.connect(self.address)
        return sock

    def wait_connected(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    # ------------------------------------------------------- cross-thread API
    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the I/O thread (soon, in order)."""
        self._enqueue(fn)

    def _enqueue(self, command: Any) -> None:
        """Queue a command (a callable, or a pipelined send's tuple) and wake
        the I/O thread if it may be asleep."""
        if self.closed:
            raise ClientClosed("the client is closed")
        self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def request(
        self, msg: Any, body: Optional[bytes] | list, waiter: Optional[Waiter], on_reply: Optional[Callable] = None
    ) -> None:
        """Send a request; its reply resolves ``waiter`` (``on_reply(value)``
        may transform the value, or raise). The I/O thread numbers it."""

        def start() -> None:
            try:
                self._start_request(msg, body, waiter, on_reply)
            except Exception as exc:  # a value the clients failed to check: fail the caller, not the thread
                if waiter is None:
                    raise
                with self.lock:
                    waiter.resolve(None, exc)

        self.call(start)

    def send_pipelined(self, channel: str, body: bytes, ttl: float, capacity: int) -> None:
        """Send without waiting (answered only if the broker refuses it).
        The I/O thread packs consecutive sends to one channel into one
        ``Send`` with many bodies."""
        self._enqueue((channel, ttl, capacity, body))

    def group_send_pipelined(self, msg: p.GroupSend, body: bytes, on_reply: Callable[[Any], Any]) -> None:
        """A group_send nobody waits for (the window counted it:
        ``may_pipeline_group``): ``on_reply(value)`` runs on the I/O thread
        when the answer comes; a refusal, or no answer within the timeout,
        is logged (``LoggingWaiter``). Either way the window hears of it."""
        self.request(msg, body, LoggingWaiter("group_send", self.state.window.group_done), on_reply)

    def post(self, msg: Any, body: Optional[bytes] = None) -> None:
        """Send a message that expects no reply."""
        self.call(lambda: self._send_frames(self._frames(msg, body)))

    # ---------------------------------------------------------------- receive
    def take(self, channel: str, make_waiter: Callable[[ChannelState], W]) -> tuple[Optional[Item], Optional[W]]:
        """The next message of ``channel`` if one is here, else a new waiter
        (``make_waiter(channel state)``) that the next delivery resolves with
        ``(body, deadline)``. Grants the broker credit as the state decides."""
        now = time.monotonic()
        with self.lock:
            state = self.state
            was_due = state.report_due
            item, waiter, grant = state.take(channel, now, make_waiter, self.connected)
            if grant is not None:
                self.post(grant)
            elif waiter is not None and not self.connected:
                self.call(_nothing)  # wake the I/O thread: it grants credit once connected
            if state.report_due and not was_due:
                self._report_soon()
        return item, waiter

    def fetch_ahead(self, channel: str) -> None:
        """Grant ``channel`` credit now, as its first receive would (see
        ``ClientState.fetch_ahead``). Not connected yet: the first receive
        grants it."""
        with self.lock:
            self._grant(self.state.fetch_ahead(channel, time.monotonic(), self.connected))

    def put_back(self, channel: str, item: Item) -> None:
        """A message whose receive was cancelled as it was resolved: first in
        line again."""
        with self.lock:
            self._grant(self.state.put_back(channel, item, time.monotonic(), self.connected))
            self._after_loop_side()

    def forget_waiter(self, channel: str, waiter: Waiter) -> None:
        with self.lock:
            self.state.forget_waiter(channel, waiter)

    # -- the waiters' hub (see waiters.Hub) --
    def schedule(self, waiter: AsyncWaiter, value: Any, error: Optional[BaseException]) -> None:
        self._calls.setdefault(waiter.loop, []).append((waiter, value, error))

    def settled(self, channel: ChannelState, item: Item, accepted: bool) -> None:
        with self.lock:
            self._grant(self.state.settle(channel, item, accepted, time.monotonic(), self.connected))
            self._after_loop_side()

    def settled_all(self, outcomes: list[tuple[ChannelState, Item, bool]]) -> None:
        """The hand-offs of one batch, settled under one lock (a group_send
        to 500 channels here is one batch of 500)."""
        with self.lock:
            now, connected = time.monotonic(), self.connected
            settle = self.state.settle
            for channel, item, accepted in outcomes:
                self._grant(settle(channel, item, accepted, now, connected))
            self._after_loop_side()

    def _grant(self, grant: Optional[p.Subscribe]) -> None:
        """Send the credit a settle or put-back decided on, if any (a closed
        client grants nothing: its receives are failing)."""
        if grant is not None:
            try:
                self.post(grant)
            except ClientClosed:
                pass

    def _after_loop_side(self) -> None:
        """After a change made on a receive's thread (lock held): hand-offs
        it started go out now, a consumption report soon."""
        if threading.current_thread() is not self._thread:
            self._flush_calls()
            if self.state.report_due:
                self._report_soon()

    def _report_soon(self) -> None:
        """Wake the I/O thread: a ``Consumed`` report is due."""
        if threading.current_thread() is not self._thread and not self.closed:
            self._wake()

    def _report_consumed(self) -> None:
        """Send what receives took since the last report (I/O thread)."""
        with self.lock:
            report = self.state.report(self.connected)
        if report is not None and not self._send_frames(self._frames(report)):
            with self.lock:  # no connection after all: keep them for the next try
                self.state.report_failed(report)

    # -- the send window (see _state.SendWindow) --
    def may_pipeline(self, channel: str, capacity: int) -> bool:
        with self.lock:
            return self.state.window.may_pipeline(channel, capacity, self.connected)

    def may_pipeline_group(self) -> bool:
        with self.lock:
            return self.state.window.may_pipeline_group(self.connected)

    def acked(self, channel: str, depth: int) -> None:
        with self.lock:
            self.state.window.acked(channel, depth)

    def answered(self) -> None:
        with self.lock:
            self.state.window.answered()

    def refused(self, channel: str, capacity: int, full: bool) -> None:
        with self.lock:
            self.state.window.refused(channel, capacity, full)

    def remember_group(self, group: str, channel: str, ttl: float) -> None:
        """A membership this process added: replayed after a broker restart."""
        deadline = time.monotonic() + ttl
        self.call(lambda: self._locked(self.state.remember_group, group, channel, deadline))

    def forget_group(self, group: str, channel: str) -> None:
        self.call(lambda: self._locked(self.state.forget_group, group, channel))

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            return fn(*args)

    # ----------------------------------------------------------------- close
    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, say goodbye, stop the thread. Idempotent.
        An inherited core is left alone: it is the parent's."""
        if self.closed or self.inherited:
            return
        done = threading.Event()

        def finish() -> None:
            self._send_frames(self._frames(p.Bye()))
            done.set()
            raise _Stop

        self.call(finish)
        self.closed = True
        if threading.current_thread() is not self._thread:
            done.wait(timeout)
            self._thread.join(timeout)

    # ============================================================ I/O thread
    def _flush_calls(self) -> None:
        """Hand the outcomes of this batch to their loops, one call per loop
        (lock held)."""
        calls, self._calls = self._calls, {}
        for loop, batch in calls.items():
            try:
                loop.call_soon_threadsafe(_run_batch, self, batch)
            except RuntimeError:  # the loop is closed: its waiters are gone
                for waiter, value, error in batch:
                    waiter.undeliverable(value, error)

    def _frames(self, msg: Any, body: Optional[bytes] | list = None) -> list:
        header = p.encode(msg)
        if body is None:
            return [header]
        if isinstance(body, list):
            return [header, *body]
        return [header, body]

    def _send_frames(self, frames: list) -> bool:
        """Send one message without blocking; False if no connection is up
        (with IMMEDIATE only the first frame can fail). Losing the connection
        ends pipelining at once: later sends wait for an answer."""
        send = self._socket.send
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                big = len(frame) >= _ZERO_COPY_THRESHOLD
                send(frame, _NOBLOCK if i == last else _MORE_NOBLOCK, copy=not big)
        except zmq.Again:
            if self.connected:
                with self.lock:
                    self.connected = False
                self._ready.clear()
                logger.warning("lost the connection to the broker at %s", self.address)
            return False
        return True

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            item = commands.popleft()
            if type(item) is not tuple:
                try:
                    item()
                except _Stop:
                    raise
                except Exception:  # one bad command must not end the thread (and every caller's calls)
                    logger.exception("client command failed")
                continue
            channel, ttl, capacity, body = item  # a pipelined send: pack its successors
            bodies = [body]
            size = len(body)
            while commands and len(bodies) < p.MAX_BATCH and size < _PACK_BYTES:
                following = commands[0]
                if type(following) is not tuple or following[:3] != item[:3]:
                    break
                commands.popleft()
                bodies.append(following[3])
                size += len(following[3])
            self._start_request(p.Send(0, channel, ttl, capacity, False), bodies, None, None, track=False)

    def _start_request(
        self,
        msg: Any,
        body: Optional[bytes] | list,
        waiter: Optional[Waiter],
        on_reply: Optional[Callable],
        track: bool = True,
        first: bool = False,
    ) -> int:
        """Number and send a request. Untracked requests (pipelined sends)
        are remembered only while they wait for a connection; the broker
        answers them only to refuse, which is logged."""
        if self.auth_error is not None:  # --- CURVE: refused; fail fast
            if waiter is not None:
                with self.lock:
                    waiter.resolve(None, self.auth_error)
            return 0
        requests = self._requests
        req = requests.number()
        frames = self._frames(msgspec.structs.replace(msg, req=req), body)
        now = time.monotonic()
        if not requests.backlog and self._send_frames(frames):
            if track:
                requests.sent(req, waiter, on_reply, now + self.timeout)
            return req
        # No connection. A pipelined send already returned to its caller: it
        # waits for a broker as long as its message would live (then it is
        # dropped, with a log line); a request waits for its timeout.
        deadline = now + (msg.ttl if not track else self.timeout)
        overflow = requests.hold(req, frames, waiter, on_reply, deadline, track, first)
        if overflow is not None:
            self._drop_request(overflow, "the backlog is full")
        return req

    def _drop_request(self, req: int, why: str) -> None:
        request = self._requests.pop(req)
        if request is None:
            return
        if not request.track:
            logger.error("a message was dropped: no broker answered at %s (%s)", self.address, why)
        if request.waiter is not None:
            with self.lock:
                request.waiter.resolve(None, BrokerUnavailable(self.address, self.timeout))

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        monitor = self._monitor  # attached in _new_socket, before connect
        poller.register(monitor, zmq.POLLIN)
        self._hello()
        try:
            while True:
                timeout_ms = 20 if (self._requests.backlog or not self.connected) else max(1, int(self.heartbeat * 250))
                events = dict(poller.poll(timeout_ms))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
                self._wake_pending = False
                if monitor in events:
                    self._on_monitor_events(monitor)
                if self.state.report_due:  # what receives took goes before later sends
                    self._report_consumed()
                self._run_commands()
                self._read_all()
                self._tick(time.monotonic())
                if self.state.report_due:
                    self._report_consumed()
                if self._calls:
                    with self.lock:
                        self._flush_calls()
        except _Stop:
            pass
        except Exception:  # pragma: no cover - a bug: fail every caller loudly
            logger.exception("client I/O thread failed")
        finally:
            self.closed = True
            self._fail_all(ClientClosed("the client is closed"))
            with self.lock:
                self._flush_calls()
            self._socket.disable_monitor()
            monitor.close(0)
            self._socket.close(linger=_CLOSE_LINGER_MS if self.connected else 0)
            self._context.term()
            _lifecycle.untrack(self)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_monitor_events(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, _NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED and self.connected:
                logger.warning("lost the connection to the broker at %s", self.address)
                with self.lock:
                    self.connected = False
                self._ready.clear()
            elif event == zmq.EVENT_CONNECTED and self.instance is not None:
                self._hello()  # a reconnection: maybe a new broker; Hello restores our state
            elif event & _HANDSHAKE_EVENTS:
                self._on_handshake(event)

    # --- CURVE: handshake outcomes (the decisions: _handshake.Handshake) ---
    @property
    def auth_error(self) -> Optional[AuthenticationFailed]:
        """Set while the broker refuses our handshake: every call fails with it."""
        return self._handshake.error

    def _on_handshake(self, event: int) -> None:
        handshake = self._handshake
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if handshake.succeeded():
                logger.info("the broker at %s accepted this client again", self.address)
                self._hello()
            return
        kind = _FAILURES.get(event, "vague")
        was_refused = handshake.error is not None
        if not handshake.failed(kind, time.monotonic(), _AUTH_RETRY):
            return
        assert handshake.error is not None
        if not was_refused:
            logger.error("the broker at %s refused this client: %s", self.address, handshake.error.reason)
        with self.lock:
            self.connected = False
        self._ready.clear()
        self._fail_all(handshake.error)

    def _retry_handshake(self, now: float) -> None:
        """Fail receives that came in meanwhile; now and then, try again
        (the key may have been authorized since)."""
        assert self.auth_error is not None
        self._fail_all(self.auth_error)
        if self._handshake.retry_due(now, _AUTH_RETRY):
            try:
                self._socket.disconnect(self.address)
                self._socket.connect(self.address)
            except zmq.ZMQError as exc:  # pragma: no cover - the address was valid at connect
                logger.warning("cannot reconnect to %s: %s", self.address, exc)

    def _fail_all(self, error: BrokerError) -> None:
        requests = self._requests.clear()
        with self.lock:
            for request in requests:
                if request.waiter is not None:
                    request.waiter.resolve(None, error)
            self.state.fail_waiters(error)

    def _read_all(self) -> None:
        recv = self._socket.recv
        while True:
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame]
            while frame.more:
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame)
            self._last_heard = time.monotonic()
            try:
                msg = p.decode_to_client(frames[0].buffer)
            except BrokerError as exc:
                logger.warning("bad message from broker: %s", exc)
                continue
            match msg:
                case p.Deliver(channel, ttls, channels, body_of):
                    count = len(body_of) if body_of else len(frames) - 1
                    if len(ttls) != count or (channels and len(channels) != count):
                        logger.warning("bad Deliver from broker: %d ttls, %d bodies", len(ttls), count)
                        continue
                    bodies = [f.bytes for f in frames[1:]]
                    shared = None
                    if body_of:  # a body for several channels here: sent once, decoded once
                        try:
                            bodies, shared = share_bodies(bodies, body_of)
                        except ValueError as exc:
                            logger.warning("bad Deliver from broker: %s", exc)
                            continue
                    self._on_deliver(channels or [channel] * count, bodies, ttls, shared)
                case p.Reply(req, code, detail, value):
                    self._on_reply(req, code, detail, value)
                case p.Flushed(epoch, prefix):
                    self._on_flushed(epoch, prefix)
                case p.Welcome(instance, max_body):
                    # The broker does not know us: a new broker, or the same
                    # one after it dropped us (missed heartbeats, a send that
                    # found us gone). Either way our credit and subscriptions
                    # are gone there: say Hello, which grants them again.
                    self.max_body = max_body
                    if instance != self.instance:
                        logger.info("broker %s is new to this client: restoring state", instance)
                    else:
                        logger.info("broker %s had forgotten this client: restoring state", instance)
                    self._hello()

    def _on_flushed(self, epoch: int, prefix: str = "") -> None:
        with self.lock:
            self.state.flushed(epoch, prefix)

    def _on_deliver(
        self, channels: list[str], bodies: list[bytes], ttls: list[float], shared: Optional[list[Optional[Shared]]]
    ) -> None:
        now = time.monotonic()
        with self.lock:
            grants = self.state.deliver(channels, bodies, ttls, now, shared, self.connected)
            if self._calls:  # the receives' loops start on these while we read the next Deliver
                self._flush_calls()
        for grant in grants:  # on the I/O thread: straight to the socket
            self._send_frames(self._frames(grant))

    def _on_reply(self, req: int, code: int, detail: str, value: Any) -> None:
        request = self._requests.pop(req)
        if request is None:
            if code == SubscriptionError.code and isinstance(value, dict) and value.get("channel"):
                with self.lock:
                    self.state.refuse(value["channel"], from_wire(code, detail, value))
            elif code:
                logger.error("broker refused a message: %s", detail)
                if code == QueueFull.code and isinstance(value, dict) and isinstance(value.get("channel"), str):
                    with self.lock:  # the next sends to it wait for an exact QueueFull
                        self.state.window.refused_pipelined(value["channel"])
            return
        if code:
            error: Optional[BaseException] = from_wire(code, detail, value)
            result = None
        else:
            error = None
            result = value
            if request.on_reply is not None:
                try:
                    result = request.on_reply(value)
                except BaseException as exc:
                    error = exc
        if request.waiter is not None:
            with self.lock:
                request.waiter.resolve(result, error)
        elif error is not None:
            logger.error("broker refused a pipelined message: %s", error)

    # -------------------------------------------------------------- the clock
    def _hello(self) -> None:
        self._last_hello = time.monotonic()

        def welcomed(value: Any) -> None:
            instance, max_body, epoch = value
            restarted = self.instance is not None and instance != self.instance
            self.instance, self.max_body = instance, max_body
            with self.lock:
                self.state.epoch = epoch
            self._on_connected(restarted)

        hello = p.Hello(0, self.client_id, self.heartbeat, shared_bodies=True, **hello_fields())
        self._start_request(hello, None, None, welcomed, first=True)

    def _on_connected(self, restarted: bool) -> None:
        self._unreachable_reported = False
        with self.lock:
            self.connected = True  # under the lock: take() must not grant while credit is reset
            out = self.state.connected(time.monotonic(), restarted)
        for msg in out:
            if isinstance(msg, p.GroupAdd):
                self._start_request(msg, None, None, None)
            else:
                self._send_frames(self._frames(msg))
        self._ready.set()

    def _tick(self, now: float) -> None:
        if self._requests.backlog:
            self._requests.drain(self._send_frames)
        if now < self._next_scan:
            return
        self._next_scan = now + _SCAN_INTERVAL
        if self.auth_error is not None:  # --- CURVE: no liveness checks while refused
            self._retry_handshake(now)
            return
        # request timeouts
        for req in self._requests.expired(now):
            self._drop_request(req, "timed out")
        # liveness
        silent = now - self._last_heard
        if self.connected and silent > self.heartbeat * 3:
            logger.warning("broker at %s silent for %.1fs: reconnecting", self.address, silent)
            self.connected = False
            self._ready.clear()
        if not self.connected:
            if now - self._last_hello > max(self.heartbeat, _CONNECT_PROBE):
                self._reconnect()
        elif silent > self.heartbeat and self._heartbeat_req not in self._requests:
            self._heartbeat_req = self._start_request(p.Heartbeat(0), None, None, self._check_instance)
        if now >= self._next_idle_scan:
            self._next_idle_scan = now + self._idle_scan_interval
            self._return_idle(now)

    def _check_instance(self, instance: Any) -> None:
        if instance != self.instance:
            logger.info("broker instance changed (%s): restoring state", instance)
            self._hello()

    def _reconnect(self) -> None:
        if self.on_unreachable is not None and not self._unreachable_reported:
            self._unreachable_reported = True
            threading.Thread(target=self.on_unreachable, args=(self.address,), daemon=True).start()
        # Old requests keep their deadlines; unsent ones stay in the backlog.
        for req in self._requests.internal():  # hellos and heartbeats to a dead peer
            self._requests.pop(req)
        self._hello()

    def _return_idle(self, now: float) -> None:
        """Withdraw credit from channels nobody receives from; hand their
        unread messages back to the broker once it confirms."""
        with self.lock:
            withdrawals = self.state.idle(now)
        for msg in withdrawals:

            def withdrawn(_left: Any, name: str = msg.channel) -> None:
                with self.lock:
                    out = self.state.withdrawn(name, time.monotonic(), self.connected)
                for header, bodies in out:
                    self._send_frames(self._frames(header, bodies))

            self._start_request(msg, None, None, withdrawn)


class _Stop(Exception):
    pass


def _nothing() -> None:
    pass


def _run_batch(core: Core, batch: list[tuple[AsyncWaiter, Any, Optional[BaseException]]]) -> None:
    """On a loop: the outcomes the I/O thread scheduled for it; the receives'
    hand-offs are reported back in one call (one lock, one clock read)."""
    outcomes = []
    try:
        for waiter, value, error in batch:
            accepted = waiter.outcome(value, error)
            if accepted is not None:
                assert waiter.channel is not None
                outcomes.append((waiter.channel, value, accepted))
    finally:
        if outcomes:
            core.settled_all(outcomes)
