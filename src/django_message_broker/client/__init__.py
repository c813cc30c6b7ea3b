"""Clients for the broker: ``AsyncClient`` (asyncio) and ``SyncClient``
(blocking), two faces of one protocol core (``client.core.Core``).

Both may be used from any number of threads and event loops at once. A
client owns one I/O thread and one socket; make one per process and
``close()`` it when done (it is also a context manager).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Optional, Sequence, TypeVar

from .. import protocol as p
from ..exceptions import ClientClosed, MessageTooLarge, QueueFull
from ..keys import client_curve
from ..server.server import DEFAULT_ADDRESS
from .core import AsyncWaiter, Core, SyncWaiter

__all__ = ["DEFAULT_ADDRESS", "AsyncClient", "SyncClient"]

_MAX_TRACKED_CHANNELS = 10_000
#: Pipelined (unanswered) sends a process may have in flight before one waits.
MAX_UNACKED = 4096
_C = TypeVar("_C", bound="_ClientBase")
_shared_lock = threading.Lock()
_shared_cores: dict[tuple, list] = {}  # settings -> [core, number of clients using it]


class _ClientBase:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 5.0,
        heartbeat: float = 1.0,
        prefetch: int = 16,
        process_prefetch: int = 128,
        idle_return: float = 1.0,
        embedded: bool = False,
        embedded_idle_timeout: float = 60.0,
        shared: bool = False,
        server_key: Any = None,
        client_key: Any = None,
    ) -> None:
        # --- CURVE (docs/security.md): server_key is the broker's public
        # certificate file or Z85 text; client_key this client's secret
        # certificate file. Read now so that a bad file fails here.
        client_curve(server_key, client_key)
        self.address = address
        self.timeout = timeout
        self.embedded = embedded
        self._options = dict(
            timeout=timeout,
            heartbeat=heartbeat,
            prefetch=prefetch,
            process_prefetch=process_prefetch,
            idle_return=idle_return,
            server_key=server_key,
            client_key=client_key,
        )
        self._embedded_idle_timeout = embedded_idle_timeout
        # Shared clients with the same settings use one connection per process,
        # so that their messages keep one order on one pipe.
        self._shared_key: Optional[tuple] = (
            (address, embedded, embedded_idle_timeout, *sorted(self._options.items())) if shared else None
        )
        self._core: Optional[Core] = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def core(self) -> Core:
        core = self._core
        if core is None:
            with self._lock:
                if self._closed:
                    raise ClientClosed("the client is closed")
                if self._core is None:
                    key = self._shared_key
                    if key is None:
                        self._core = self._new_core()
                    else:
                        with _shared_lock:
                            entry = _shared_cores.get(key)
                            if entry is None or entry[0].closed:
                                entry = _shared_cores[key] = [self._new_core(), 0]
                            entry[1] += 1
                            self._core = entry[0]
                core = self._core
        return core

    def _new_core(self) -> Core:
        on_unreachable: Optional[Callable[[str], None]] = None
        if self.embedded:
            from ..embedded import ensure_broker

            idle = self._embedded_idle_timeout

            keys = {"server_key": self._options["server_key"], "client_key": self._options["client_key"]}

            def on_unreachable(address: str) -> None:
                ensure_broker(address, idle_timeout=idle, **keys)

        return Core(self.address, on_unreachable=on_unreachable, **self._options)  # type: ignore[arg-type]

    def twin(self, cls: type[_C]) -> _C:
        """A client of another kind (``AsyncClient``/``SyncClient``) sharing
        this one's connection, receive buffers and send window. Close the
        original, not the twin."""
        other = cls.__new__(cls)
        other.__dict__.update(self.__dict__)
        other._core = self.core
        return other

    @property
    def client_id(self) -> str:
        """Unique per client (random, not affected by ``random.seed``)."""
        return self.core.client_id

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until the broker has answered (or ``timeout`` passes)."""
        return self.core.wait_connected(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        """Send what is queued, leave the broker, stop the I/O thread."""
        with self._lock:
            self._closed = True
            core, self._core = self._core, None
        if core is None:
            return
        if self._shared_key is not None:
            with _shared_lock:
                entry = _shared_cores.get(self._shared_key)
                if entry is not None and entry[0] is core:
                    entry[1] -= 1
                    if entry[1] > 0:
                        return
                    del _shared_cores[self._shared_key]
        core.close()

    # -- shared rules -------------------------------------------------------
    def _check_body(self, core: Core, body: bytes) -> None:
        if len(body) > core.max_body:
            raise MessageTooLarge(len(body), core.max_body)

    def _pipelined(self, core: Core, channel: str, capacity: int) -> bool:
        """Send without waiting while the channel is known to be at most half
        full (the last depth the broker reported plus our own sends since)
        and this process has fewer than ``MAX_UNACKED`` unanswered sends in
        all. Near capacity, wait for the broker's answer: exact
        ``QueueFull``. Every answered send resets the process-wide count, so
        a producer never runs more than one window ahead of the broker."""
        depths = core.depth
        depth = depths.get(channel, 0)
        if core.connected and depth < capacity // 2 and core.unacked < MAX_UNACKED:
            depths[channel] = depth + 1
            core.unacked += 1
            return True
        return False

    def _send_now_or_request(self, channel: str, body: bytes, ttl: float, capacity: int) -> tuple[Core, Any]:
        """Check a send; pipeline it if the rules allow (returns no request),
        else return the checked ``Send`` to wait for."""
        p.check_channel_name(channel)
        core = self.core
        self._check_body(core, body)
        if self._pipelined(core, channel, capacity):
            core.send_pipelined(channel, body, ttl, capacity)
            return core, None
        return core, p.Send(0, channel, ttl, capacity, True)

    def _group_send(
        self, group: str, body: bytes, ttl: float, capacity: int, capacities: Sequence[tuple[str, int]]
    ) -> p.GroupSend:
        p.check_group_name(group)
        self._check_body(self.core, body)
        return p.GroupSend(0, group, ttl, capacity, list(capacities))

    def _send_failed(self, core: Core, channel: str, capacity: int, error: BaseException) -> None:
        # Full: the next sends must ask the broker too. Anything else: unknown.
        if isinstance(error, QueueFull):
            core.depth[channel] = capacity
        else:
            core.depth.pop(channel, None)

    def _record_depth(self, core: Core, channel: str) -> Callable[[Any], None]:
        def record(depth: Any) -> None:
            core.unacked = 0  # the broker has read everything sent before this
            if len(core.depth) >= _MAX_TRACKED_CHANNELS:
                core.depth.clear()
            core.depth[channel] = int(depth)

        return record


class AsyncClient(_ClientBase):
    """Asyncio client. Every method may be awaited from any event loop."""

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    async def _request(self, msg: Any, body: Optional[bytes] = None, on_reply: Optional[Callable] = None) -> Any:
        core = self.core
        waiter = AsyncWaiter(core)
        core.request(msg, body, waiter, on_reply)
        return await waiter.future

    async def send(self, channel: str, body: bytes, *, ttl: float = 60.0, capacity: int = 100) -> None:
        """Queue ``body`` on ``channel``. Raises ``QueueFull`` at capacity,
        ``MessageTooLarge``, ``InvalidName``, ``BrokerUnavailable``."""
        core, msg = self._send_now_or_request(channel, body, ttl, capacity)
        if msg is None:
            return
        try:
            await self._request(msg, body, self._record_depth(core, channel))
        except BaseException as error:
            self._send_failed(core, channel, capacity, error)
            raise

    async def receive(self, channel: str) -> bytes:
        """The next message of ``channel``. Cancelling loses nothing."""
        p.check_channel_name(channel)
        core = self.core
        item, waiter = core.take(channel, lambda: AsyncWaiter(core, channel))
        if item is not None:
            return item[0]
        assert waiter is not None
        try:
            item = await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                core._put_back(channel, future.result())  # resolved as we were cancelled
            else:
                core.forget_waiter(channel, waiter)
            raise
        return item[0]  # type: ignore[no-any-return]

    async def group_add(self, group: str, channel: str, *, ttl: float = 86400.0) -> None:
        await self._request(_group_add(group, channel, ttl))
        self.core.remember_group(group, channel, ttl)

    async def group_discard(self, group: str, channel: str) -> None:
        msg = _group_discard(group, channel)
        self.core.forget_group(group, channel)
        await self._request(msg)

    async def group_send(
        self,
        group: str,
        body: bytes,
        *,
        ttl: float = 60.0,
        capacity: int = 100,
        capacities: Sequence[tuple[str, int]] = (),
    ) -> tuple[int, int]:
        """Send to every member; full members are skipped. ``capacities``:
        (regex, capacity) rules for members, first match wins. Returns
        ``(delivered, skipped)``."""
        sent, skipped = await self._request(self._group_send(group, body, ttl, capacity, capacities), body)
        return sent, skipped

    async def flush(self) -> None:
        """Drop every queued message and group on the broker."""
        await self._request(p.Flush(0))

    async def stats(self) -> dict[str, Any]:
        return await self._request(p.Stats(0))  # type: ignore[no-any-return]


class SyncClient(_ClientBase):
    """Blocking client for worker processes and threads."""

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, msg: Any, body: Optional[bytes] = None, on_reply: Optional[Callable] = None) -> Any:
        core = self.core
        waiter = SyncWaiter()
        core.request(msg, body, waiter, on_reply)
        return waiter.wait(core, None)  # the core times requests out

    def send(self, channel: str, body: bytes, *, ttl: float = 60.0, capacity: int = 100) -> None:
        """As ``AsyncClient.send``, blocking."""
        core, msg = self._send_now_or_request(channel, body, ttl, capacity)
        if msg is None:
            return
        try:
            self._request(msg, body, self._record_depth(core, channel))
        except BaseException as error:
            self._send_failed(core, channel, capacity, error)
            raise

    def receive(self, channel: str, timeout: Optional[float] = None) -> bytes:
        """The next message of ``channel``; ``TimeoutError`` after ``timeout``
        seconds (``None``: wait for ever). A timed-out receive loses nothing."""
        p.check_channel_name(channel)
        core = self.core
        item, waiter = core.take(channel, lambda: SyncWaiter(channel))
        if item is None:
            assert waiter is not None
            try:
                item = waiter.wait(core, timeout)
            except TimeoutError:
                core.forget_waiter(channel, waiter)
                raise
        return item[0]  # type: ignore[no-any-return]

    def group_add(self, group: str, channel: str, *, ttl: float = 86400.0) -> None:
        self._request(_group_add(group, channel, ttl))
        self.core.remember_group(group, channel, ttl)

    def group_discard(self, group: str, channel: str) -> None:
        msg = _group_discard(group, channel)
        self.core.forget_group(group, channel)
        self._request(msg)

    def group_send(
        self,
        group: str,
        body: bytes,
        *,
        ttl: float = 60.0,
        capacity: int = 100,
        capacities: Sequence[tuple[str, int]] = (),
    ) -> tuple[int, int]:
        """As ``AsyncClient.group_send``, blocking."""
        sent, skipped = self._request(self._group_send(group, body, ttl, capacity, capacities), body)
        return sent, skipped

    def flush(self) -> None:
        self._request(p.Flush(0))

    def stats(self) -> dict[str, Any]:
        return self._request(p.Stats(0))  # type: ignore[no-any-return]


def _group_add(group: str, channel: str, ttl: float) -> p.GroupAdd:
    p.check_group_name(group)
    p.check_channel_name(channel)
    return p.GroupAdd(0, group, channel, ttl)


def _group_discard(group: str, channel: str) -> p.GroupDiscard:
    p.check_group_name(group)
    p.check_channel_name(channel)
    return p.GroupDiscard(0, group, channel)
