"""The broker process: a zmq.asyncio ROUTER socket around ``Broker``.

How it works. One reader task waits until the socket is readable, then
reads every message that is ready (non-blocking, up to a batch) and hands
each to ``Broker.handle``; replies and deliveries are written without
awaiting. One sweeper task ticks ten times a second: it retries deliveries
to peers that were busy and, once a second, expires messages, endpoints,
memberships and silent clients. There is no task or timer per queue.

Security (docs/security.md). With ``secret_key`` the socket is a CURVE
server: every connection is encrypted. With ``authorized_keys`` (a
directory of client certificates) a ZAP handler on this loop admits only
those clients; ``reload_keys()`` (SIGHUP under ``serve``) re-reads the
directory, which affects new connections only. A non-loopback TCP address
without ``secret_key`` is refused unless ``insecure``.

Use it as ``async with BrokerServer("tcp://127.0.0.1:0") as server: ...``
(``server.address`` is the bound address) or run ``python -m
django_message_broker serve``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Optional

import zmq
import zmq.asyncio

from ..keys import server_curve
from ..options import DEFAULT_ADDRESS, is_local_address  # DEFAULT_ADDRESS re-exported: its home was here
from .broker import DEFAULT_MAX_BODY, Broker

__all__ = ["DEFAULT_ADDRESS", "BrokerServer", "check_bind", "run_until_stopped", "serve"]

logger = logging.getLogger("django_message_broker.server")

_BATCH = 512
_PEER_HWM = 50_000
_TICK = 0.1


def normalize_bind(address: str) -> str:
    """``tcp://host:0`` means "any free port" (zmq spells it ``*``)."""
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-1] + "*"
    return address


def check_bind(address: str, *, secret_key: Any = None, authorized_keys: Any = None, insecure: bool = False) -> None:
    """Refuse (``ValueError``) a configuration that would expose plain text:
    a TCP address off loopback without a secret key, unless ``insecure``.
    Called before anything is bound."""
    if authorized_keys and not secret_key:
        raise ValueError("authorized keys need the broker's secret key (--secret-key)")
    if secret_key or is_local_address(address):
        return
    if not insecure:
        raise ValueError(
            f"{address} is not a loopback address: give the broker a secret key (--secret-key, see "
            "docs/security.md), or --insecure to serve plain text to anyone who can reach it"
        )


class BrokerServer:
    """The broker, as an async context manager.

    ``max_memory``: bytes of queued messages held at most, broker-wide
    (``None``: a quarter of the host's physical memory); past it sends are
    refused with ``QueueFull`` (see ``broker.py``).
    ``idle_timeout``: exit by itself (``wait_closed`` returns) after having no
    clients and no queued messages for this many seconds; ``None``: never.
    ``secret_key``: the broker's secret certificate file (CURVE).
    ``authorized_keys``: a directory of the clients' public certificates.
    ``insecure``: allow a non-loopback address without ``secret_key``.
    ``ipc_mode``: chmod an ``ipc://`` socket file to this mode after binding.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_queue_length: Optional[int] = None,
        max_memory: Optional[int] = None,
        idle_timeout: Optional[float] = None,
        context: Optional[zmq.asyncio.Context] = None,
        secret_key: Optional[str] = None,
        authorized_keys: Optional[str] = None,
        insecure: bool = False,
        ipc_mode: Optional[int] = None,
    ) -> None:
        self.requested_address = address
        self.address = address
        self.max_body = max_body
        self.max_queue_length = max_queue_length
        self.max_memory = max_memory
        self.idle_timeout = idle_timeout
        self.secret_key = secret_key
        self.authorized_keys = authorized_keys
        self.insecure = insecure
        self.ipc_mode = ipc_mode
        self._authenticator: Any = None
        self._context = context
        self._own_context = context is None
        self._socket: Optional[zmq.asyncio.Socket] = None
        self._tasks: list[asyncio.Task] = []
        self._closed: Optional[asyncio.Event] = None
        self.broker: Optional[Broker] = None
        #: Why the server stopped by itself, if it failed (``serve`` re-raises it).
        self.failure: Optional[BaseException] = None

    async def __aenter__(self) -> BrokerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        # Every refusal comes before anything is bound.
        check_bind(
            self.requested_address,
            secret_key=self.secret_key,
            authorized_keys=self.authorized_keys,
            insecure=self.insecure,
        )
        curve = server_curve(self.secret_key)
        if self.authorized_keys is not None and not os.path.isdir(self.authorized_keys):
            raise ValueError(f"authorized keys: {self.authorized_keys} is not a directory")
        if not curve and not is_local_address(self.requested_address):
            logger.warning(
                "serving PLAIN TEXT on %s (--insecure): anyone who can reach it may read and send messages",
                self.requested_address,
            )
        ctx = self._context or zmq.asyncio.Context()
        self._context = ctx
        sock = ctx.socket(zmq.ROUTER)
        if curve:
            if self.authorized_keys is not None:
                self._start_authenticator(ctx)
            else:
                logger.warning("CURVE without authorized keys: traffic is encrypted, but any client may connect")
            sock.curve_publickey, sock.curve_secretkey = curve
            sock.curve_server = True
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # never drop silently
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes its id back
        sock.setsockopt(zmq.LINGER, 0)
        # Credit bounds deliveries; this bounds what queues for a peer that
        # stops reading its replies (past it, replies to that peer are dropped
        # and deliveries wait in their queues).
        sock.setsockopt(zmq.SNDHWM, _PEER_HWM)
        sock.setsockopt(zmq.RCVHWM, 0)
        # Frames past the body limit get a typed reply; far past it, the
        # peer is cut off before the frame is read into memory.
        sock.setsockopt(zmq.MAXMSGSIZE, max(8 * self.max_body, 64 << 20))
        try:
            sock.bind(normalize_bind(self.requested_address))
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.ipc_mode is not None and self.address.startswith("ipc://") and "://@" not in self.address:
                os.chmod(self.address[len("ipc://") :], self.ipc_mode)
        except (zmq.ZMQError, OSError):
            sock.close(0)
            self._stop_authenticator()
            if self._own_context:
                ctx.term()
            raise
        self._socket = sock
        sync_socket: zmq.Socket = zmq.Socket.shadow(sock.underlying)  # plain calls on the hot path
        self.broker = Broker(
            sync_socket,
            clock=time.monotonic,
            max_body=self.max_body,
            max_queue_length=self.max_queue_length,
            max_memory=self.max_memory,
            autoflush=False,  # deliveries go out once per batch read (see _read_loop)
        )
        self._closed = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._read_loop(sync_socket), name="dmb-reader"),
            asyncio.create_task(self._sweep_loop(), name="dmb-sweeper"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        logger.info(
            "broker %s listening on %s (%s)",
            self.broker.instance,
            self.address,
            "CURVE" if curve else "plain text",
        )

    def _start_authenticator(self, ctx: zmq.asyncio.Context) -> None:
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth = AsyncioAuthenticator(ctx)
        auth.start()
        self._authenticator = auth
        self.reload_keys()

    def _stop_authenticator(self) -> None:
        auth, self._authenticator = self._authenticator, None
        if auth is not None:
            auth.stop()

    def reload_keys(self) -> int:
        """Re-read the authorized-keys directory (``serve`` does it on
        SIGHUP). Connections already up stay; a new connection is checked
        against the new set. Returns how many keys are authorized."""
        auth = self._authenticator
        if auth is None:
            return 0
        try:
            auth.configure_curve(domain="*", location=self.authorized_keys)
        except OSError as exc:  # the directory is gone: keep the keys we had
            logger.error("cannot re-read authorized keys from %s: %s; keeping the old set", self.authorized_keys, exc)
        count = len(auth.certs.get("*", {}))
        logger.info("%d authorized client key(s) in %s", count, self.authorized_keys)
        if not count:
            logger.warning("no client key is authorized in %s: every client is refused", self.authorized_keys)
        return count

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            logger.error("broker task %s failed", task.get_name(), exc_info=self.failure)
        if self._closed is not None:
            self._closed.set()

    async def _read_loop(self, sock: zmq.Socket) -> None:
        assert self._socket is not None and self.broker is not None
        handle = self.broker.handle
        poll = self._socket.poll
        recv = sock.recv_multipart
        noblock = int(zmq.NOBLOCK)
        broker = self.broker
        while True:
            await poll()
            now = time.monotonic()
            burst = True
            for _ in range(_BATCH):
                try:
                    frames = recv(noblock, copy=False)
                except zmq.Again:
                    burst = False
                    break
                try:
                    handle(frames, now)
                except Exception:  # Broker.handle answers errors itself; this is a bug's last guard
                    logger.exception("unexpected error handling a message: dropped it")
            broker.send_deliveries()  # one Deliver per peer for the whole batch
            if burst:
                await asyncio.sleep(0)  # a long burst: let the sweeper run

    async def _sweep_loop(self) -> None:
        assert self.broker is not None
        broker = self.broker
        last_sweep = idle_since = time.monotonic()
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            if broker.stalled:
                broker.retry_stalled()
            if now - last_sweep >= 1.0:
                last_sweep = now
                broker.sweep(now)
            if self.idle_timeout is not None:
                if not broker.is_idle():
                    idle_since = now
                elif now - idle_since >= self.idle_timeout:
                    logger.info("broker idle for %.0fs: exiting", self.idle_timeout)
                    return

    async def wait_closed(self) -> None:
        """Wait until the server stops (``stop()``, idle exit, or a failure)."""
        assert self._closed is not None
        await self._closed.wait()

    async def stop(self) -> None:
        """Stop serving; log what was still queued. Idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except BaseException:
                pass
        if self.broker is not None and self._socket is not None:
            queued = self.broker.queued()
            if queued:
                logger.warning(
                    "broker stopping with %d queued message(s) in %d channel(s): they are dropped",
                    queued,
                    sum(1 for q in self.broker.queues.values() if q.queue),
                )
            else:
                logger.info("broker stopped; no messages were queued")
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None
        self._stop_authenticator()
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None
        if self._closed is not None:
            self._closed.set()


async def serve(address: str = DEFAULT_ADDRESS, **options: Any) -> None:
    """Run a broker until SIGINT/SIGTERM (or idle exit)."""
    async with BrokerServer(address, **options) as server:
        await run_until_stopped(server)


async def run_until_stopped(server: BrokerServer) -> None:
    """Print the listening line, then wait for SIGINT/SIGTERM or for the
    server to stop by itself (idle exit, failure: ``RuntimeError``). The
    server still runs when this returns: the caller stops it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    if server.authorized_keys is not None and hasattr(signal, "SIGHUP"):
        try:
            loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
        except (NotImplementedError, RuntimeError):
            pass
    print(f"django-message-broker listening on {server.address}", flush=True)
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.wait_closed())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if server.failure is not None:
        raise RuntimeError("the broker failed") from server.failure
