"""The broker process: a ROUTER socket, served on a thread, around ``Broker``.

How it works. ``Broker`` is the sans-IO core; this is its shell, and the
only module of the broker that imports zmq or asyncio. The socket belongs
to one thread (``_serve``), which blocks in ``zmq_poll``: when the socket
is readable it reads every message that is ready (non-blocking, up to a
batch) and hands each to ``Broker.handle``; then it sends what the core
decided (``Broker.data_to_send``: one multi-channel ``Deliver`` per peer for
the whole batch) and reports a send that fails (``Broker.send_failed``:
EAGAIN, the peer's pipe is full; EHOSTUNREACH, the peer is gone).
``_send_all`` is the only frame-send loop. Ten times a second the same
thread retries deliveries to peers that were busy and, once a second,
expires messages, endpoints, memberships and silent clients. There is no
task or timer per queue.

Why a thread: an asyncio wake (a future per poll, a task step) costs more
than the work of a small message; the blocking poll measured about 25%
lower request/reply latency end to end (CHANGELOG, ``benchmarks/``). The
asyncio face stays: ``BrokerServer`` is an async context manager, its
``wait_closed`` is awaited, and ``serve`` handles signals on the loop,
where the ZAP authenticator (CURVE) runs too. ``stop`` wakes the thread
through an inproc pair and joins it.

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
import concurrent.futures
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from .._memory import process_rss
from ..keys import server_curve
from ..options import DEFAULT_ADDRESS, is_local_address  # DEFAULT_ADDRESS re-exported: its home was here
from .broker import BUSY, DEFAULT_MAX_BODY, GONE, Broker
from .store import FSYNC_MODES, Store

__all__ = ["DEFAULT_ADDRESS", "STORE_FILE", "BrokerServer", "check_bind", "run_until_stopped", "serve"]

logger = logging.getLogger("django_message_broker.server")

_BATCH = 512
#: Deliveries buffered in the outbox that are sent before the read batch
#: ends: a group_send to 1,000 members goes out as it is handled, and its
#: receivers start on it while the broker handles the next one.
_FLUSH_AT = 512
_PEER_HWM = 50_000
_TICK = 0.1
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)
_FAILED: dict[Any, int] = {zmq.EAGAIN: BUSY, zmq.EHOSTUNREACH: GONE}
_SRCFD = int(zmq.SRCFD)
#: The durable store's database, in the data directory.
STORE_FILE = "tasks.sqlite3"
#: Bytes of message bodies let go (cold) before freed memory is handed back.
_TRIM_AFTER = 16 << 20


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc's
    ``malloc_trim``). Bodies of a backlog that went cold are freed in many
    small pieces among live objects, and the allocator keeps such memory:
    1,000,000 queued 1 KB messages kept the broker's RSS above 1 GiB after
    they had left memory, and 166 MiB became 50 MiB with one trim. Elsewhere
    than glibc this does nothing."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
#: ZeroMQ's own heartbeats on every connection (ms): a peer whose host
#: vanished is disconnected after the timeout, while a live process answers
#: from libzmq's I/O thread however busy its Python code is.
_ZMTP_HEARTBEAT_IVL = 1000
_ZMTP_HEARTBEAT_TIMEOUT = 3000


def _send_all(sock: zmq.Socket, broker: Broker, replies_only: bool = False) -> None:
    """Send what ``broker`` decided, peer by peer, in order, never blocking.
    With ROUTER_MANDATORY only a message's first frame can fail; when one
    fails, it and the rest for that peer go back to the core (sending the
    rest could overtake it)."""
    send = sock.send
    for messages in broker.data_to_send(replies_only=replies_only):
        for i, out in enumerate(messages):
            frames = out.frames
            try:
                send(out.ident, _MORE_NOBLOCK)
                if len(frames) == 1:
                    send(frames[0], _NOBLOCK)
                else:
                    last = len(frames) - 1
                    for j, frame in enumerate(frames):
                        send(frame, _NOBLOCK if j == last else _MORE_NOBLOCK)
            except zmq.ZMQError as exc:
                errno = _FAILED.get(exc.errno)
                if errno is None:
                    raise
                broker.send_failed(messages[i:], errno)
                break


def _store_journal(broker: Broker, store: Store) -> None:
    """Hand what the core decided to the durable store; a batch the store
    committed at once (``Store.submit``) is answered at once."""
    batch = broker.take_journal()
    if batch is not None:
        done = store.submit(*batch)
        if done is not None:
            broker.committed(*done)


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
    ``data_dir``: keep durable task queues there (``store.py``); ``None``:
    in memory only. ``fsync``: ``"always"`` (a confirmed publish is on
    disk), ``"everysec"`` or ``"off"``.
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
        data_dir: Optional[str] = None,
        fsync: str = "always",
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self.requested_address = address
        self.data_dir = data_dir
        self.fsync = fsync
        self.store: Optional[Store] = None
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
        self._socket: Optional[zmq.Socket] = None
        self._thread: Optional[threading.Thread] = None
        self._wake: Optional[zmq.Socket] = None
        self._stopping = False
        self._closed: Optional[asyncio.Event] = None
        self.broker: Optional[Broker] = None
        #: ``stats`` requests from other threads, answered by the broker's.
        self._stats_requests: list[tuple[int, concurrent.futures.Future]] = []
        self._stats_lock = threading.Lock()
        #: Why the server stopped by itself, if it failed (``serve`` re-raises it).
        self.failure: Optional[BaseException] = None

    async def __aenter__(self) -> BrokerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self, on_bound: Optional[Callable[[], None]] = None) -> None:
        """Bind and serve. ``on_bound`` runs once the address is bound and
        before anyone can be answered (the embedded broker writes its pid
        file there: whoever sees it answer sees the file)."""
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
        # A plain socket: a zmq.asyncio one would register its fd with the
        # event loop, which would then wake (and touch the socket) on every
        # event, from another thread than the one that owns it.
        sock: zmq.Socket = zmq.Socket(ctx, zmq.ROUTER)
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
        sock.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_IVL)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_HEARTBEAT_TIMEOUT)
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
        self.broker = Broker(
            clock=time.monotonic,
            max_body=self.max_body,
            max_queue_length=self.max_queue_length,
            max_memory=self.max_memory,
            durable=self.data_dir is not None,
            wall_clock=time.time,
            version=_version(),
            rss=process_rss,
        )
        if self.data_dir is not None:
            self._open_store(self.data_dir)
        if on_bound is not None:
            try:
                on_bound()
            except BaseException:
                if self.store is not None:
                    self.store.close()
                    self.store = None
                self._socket.close(0)
                self._socket = None
                raise
        self._closed = asyncio.Event()
        self._start_thread(sock)
        logger.info(
            "broker %s listening on %s (%s)",
            self.broker.instance,
            self.address,
            "CURVE" if curve else "plain text",
        )

    def _open_store(self, data_dir: str) -> None:
        """Read the durable queues back (before serving anything)."""
        assert self.broker is not None
        store = Store(os.path.join(data_dir, STORE_FILE), fsync=self.fsync)
        began = time.monotonic()
        try:
            state = store.load()
        except Exception:
            if self._socket is not None:
                self._socket.close(0)
                self._socket = None
            raise
        self.broker.tasks.load_body = store.read_body
        restored = self.broker.tasks.restore(state)
        self.store = store
        logger.info(
            "durable store %s (fsync %s): %d queue(s), %d message(s) restored in %.2fs",
            store.path,
            self.fsync,
            len(state.queues),
            restored,
            time.monotonic() - began,
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

    # -- the I/O thread ------------------------------------------------------
    def _start_thread(self, sock: zmq.Socket) -> None:
        """Serve on a thread of its own: a blocking poll, no event loop per
        wake. The socket is the thread's from here until it ends; ``stop``
        wakes it through an inproc pair."""
        assert self._context is not None
        ctx: zmq.Context = zmq.Context.shadow(self._context.underlying)
        address = f"inproc://dmb-wake-{id(self):x}-{os.getpid()}"
        wake_in: zmq.Socket = ctx.socket(zmq.PAIR)
        wake_in.bind(address)
        wake = ctx.socket(zmq.PAIR)
        wake.connect(address)
        self._wake = wake
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run_thread, args=(sock, wake_in, loop), name="dmb-broker", daemon=True
        )
        self._thread.start()

    def _run_thread(self, sock: zmq.Socket, wake: zmq.Socket, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._serve(sock, wake)
        except BaseException as exc:  # reported by wait_closed and serve
            self.failure = exc
            logger.error("broker thread failed", exc_info=exc)
        finally:
            wake.close(0)
            if self._closed is not None:
                try:
                    loop.call_soon_threadsafe(self._closed.set)
                except RuntimeError:  # the loop is closed: nobody waits
                    pass

    def _serve(self, sock: zmq.Socket, wake: zmq.Socket) -> None:
        """Read every ready message (up to a batch), handle each, send what
        the core decided; every ``_TICK`` retry busy peers, once a second
        sweep, and exit when idle for ``idle_timeout``."""
        # Closed connections: whoever held task messages on one is asked at
        # once whether it is gone (Broker.connection_closed). A plain PAIR:
        # sock.get_monitor_socket() would make one of the asyncio context.
        ctx: zmq.Context = zmq.Context.shadow(sock.context.underlying)
        address = f"inproc://dmb-monitor-{id(self):x}-{os.getpid()}"
        sock.monitor(address, zmq.EVENT_DISCONNECTED)
        monitor: zmq.Socket = ctx.socket(zmq.PAIR)
        monitor.connect(address)
        # The store's thread says here which batches it committed.
        commits: zmq.Socket = ctx.socket(zmq.PAIR)
        commits_address = f"inproc://dmb-commits-{id(self):x}-{os.getpid()}"
        commits.bind(commits_address)
        notify: zmq.Socket = ctx.socket(zmq.PAIR)
        notify.connect(commits_address)
        if self.store is not None:

            def on_commit(seq: int, error: Optional[str]) -> None:  # on the store's thread: its own socket
                notify.send_string(f"{seq} {error or ''}")

            self.store.start(on_commit)
        items = [
            (sock, int(zmq.POLLIN)),
            (wake, int(zmq.POLLIN)),
            (monitor, int(zmq.POLLIN)),
            (commits, int(zmq.POLLIN)),
        ]
        try:
            self._serve_loop(sock, wake, monitor, commits, items)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            if self.store is not None:  # what was decided last goes to disk too
                if self.broker is not None:
                    _store_journal(self.broker, self.store)
                self.store.close()
            notify.close(0)
            commits.close(0)

    def _serve_loop(
        self, sock: zmq.Socket, wake: zmq.Socket, monitor: zmq.Socket, commits: zmq.Socket, items: list
    ) -> None:
        assert self.broker is not None
        broker = self.broker
        handle = broker.handle
        recv = sock.recv_multipart
        noblock = _NOBLOCK
        outbox = broker.outbox
        store = self.store
        poll = zmq.zmq_poll
        monotonic = time.monotonic
        now = last_sweep = idle_since = monotonic()
        next_tick = now + _TICK
        while True:
            ready = poll(items, max(0, int((next_tick - now) * 1000.0) + 1))  # ms, rounded up
            if self._stopping:
                return
            now = monotonic()
            if ready:
                for _ in range(_BATCH):
                    try:
                        frames = recv(noblock, copy=False)
                    except zmq.Again:
                        break
                    try:
                        handle(frames, now)
                    except Exception:  # Broker.handle answers errors itself; this is a bug's last guard
                        logger.exception("unexpected error handling a message: dropped it")
                    if broker.fd_wanted:
                        for ident in broker.fd_wanted:
                            broker.record_fd(ident, frames[1].get(_SRCFD))
                        broker.fd_wanted.clear()
                    if outbox.deliveries >= _FLUSH_AT:  # a big fan-out: its receivers start now
                        _send_all(sock, broker)
                    elif outbox.replied:  # a reply goes at once: a caller waits for it
                        _send_all(sock, broker, replies_only=True)
                _send_all(sock, broker)  # the deliveries: one Deliver per peer for the whole batch
                while True:
                    try:
                        event = recv_monitor_message(monitor, _NOBLOCK)
                    except zmq.Again:
                        break
                    broker.connection_closed(event["value"], now)
                while True:
                    try:
                        seq, _, error = commits.recv_string(_NOBLOCK).partition(" ")
                    except zmq.Again:
                        break
                    broker.committed(int(seq), error or None)
                if store is not None:
                    _store_journal(broker, store)
                if outbox:
                    _send_all(sock, broker)
            if broker.probes:
                broker.probe(now)
                if outbox:
                    _send_all(sock, broker)
            if now >= next_tick:
                next_tick = now + _TICK
                if self._stats_requests:
                    self._answer_stats(broker)
                if broker.stalled or broker.tasks_stalled:
                    broker.retry_stalled()
                if now - last_sweep >= 1.0:
                    last_sweep = now
                    broker.sweep(now)
                    if store is not None:  # expiry may have ended stored messages
                        _store_journal(broker, store)
                        if broker.tasks.cooled_bytes >= _TRIM_AFTER:
                            broker.tasks.cooled_bytes = 0
                            _release_freed_memory()
                if broker.outbox:
                    _send_all(sock, broker)
                if self.idle_timeout is not None:
                    if not broker.is_idle():
                        idle_since = now
                    elif now - idle_since >= self.idle_timeout:
                        logger.info("broker idle for %.0fs: exiting", self.idle_timeout)
                        return

    def stats(self, top: int = 0, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's stats (``Broker.stats``, or ``detailed_stats(top)``),
        from any thread (the Prometheus exporter's): the broker's thread
        answers at its next tick, within a tenth of a second. Raises
        ``TimeoutError`` if it does not (stopped)."""
        if self._thread is None or not self._thread.is_alive():
            raise TimeoutError("the broker is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._stats_lock:
            self._stats_requests.append((top, future))
        try:
            return future.result(timeout)  # type: ignore[no-any-return]
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the broker did not answer within {timeout:g}s") from None

    def _answer_stats(self, broker: Broker) -> None:
        with self._stats_lock:
            requests, self._stats_requests = self._stats_requests, []
        for top, future in requests:
            try:
                future.set_result(broker.stats() if not top else broker.detailed_stats(top))
            except Exception as exc:  # a bug: the caller sees it, the broker goes on
                future.set_exception(exc)

    async def wait_closed(self) -> None:
        """Wait until the server stops (``stop()``, idle exit, or a failure)."""
        assert self._closed is not None
        await self._closed.wait()

    async def stop(self) -> None:
        """Stop serving; log what was still queued. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            if self._wake is not None and thread.is_alive():
                try:  # a PAIR send blocks once its peer is gone: never wait
                    self._wake.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the thread is ending by itself
            thread.join()
        if self._wake is not None:
            self._wake.close(0)
            self._wake = None
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


async def serve(
    address: str = DEFAULT_ADDRESS,
    *,
    metrics_port: Optional[int] = None,
    metrics_host: Optional[str] = None,
    **options: Any,
) -> None:
    """Run a broker until SIGINT/SIGTERM (or idle exit). ``metrics_port``:
    also serve Prometheus metrics there (``metrics.py``; on loopback unless
    ``metrics_host``)."""
    stop = stop_on_signals()  # before binding: a signal during the start stops it cleanly
    async with BrokerServer(address, **options) as server:
        exporter = None
        if metrics_port is not None:
            from .. import metrics

            exporter = metrics.start(lambda top: server.stats(top), metrics_port, metrics_host)
            print(f"django-message-broker metrics on {exporter.url}", flush=True)
        try:
            await run_until_stopped(server, stop)
        finally:
            if exporter is not None:
                exporter.close()


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT and SIGTERM set from now on. Installed before the
    broker binds, so that a signal at any moment of its start (the pid file
    may already be there, the durable store still opening) ends in a clean
    stop rather than the signal's default, an exit without cleanup."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    return stop


async def run_until_stopped(server: BrokerServer, stop: Optional[asyncio.Event] = None) -> None:
    """Print the listening line, then wait for SIGINT/SIGTERM (``stop``, from
    ``stop_on_signals``; made here if not given) or for the server to stop
    by itself (idle exit, failure: ``RuntimeError``). The server still runs
    when this returns: the caller stops it."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = stop_on_signals()
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


def _version() -> str:
    from .. import __version__

    return __version__
