"""Clients for the broker: ``AsyncClient`` (asyncio) and ``SyncClient``
(blocking), two faces of one driver (``client.core.Core``) over one pure
client state (``client._state.ClientState``).

The package: ``_state`` (receive buffers, credit, consumption, the send
window: the rules, no I/O), ``_requests`` (requests in flight),
``waiters`` (how a result reaches a thread or an event loop), ``core``
(socket, I/O thread, lock), ``_handshake`` (CURVE refusals),
``_lifecycle`` (fork and exit).

Both may be used from any number of threads and event loops at once. A
client owns one I/O thread and one socket; make one per process and
``close()`` it when done (it is also a context manager). After ``fork()``,
a client made in the parent builds a fresh connection in the child the first
time the child uses it, and leaves the parent's alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

from .. import protocol as p
from ..exceptions import ClientClosed, MessageTooLarge, QueueFull
from ..keys import client_curve
from ..options import (
    CLIENT_KEYS,
    DEFAULT_ADDRESS,
    ClientOptions,
    check_capacity,
    check_timeout,
    check_ttl,
    unknown_option,
)
from ._state import Item
from .core import AsyncWaiter, Core, SyncWaiter

__all__ = ["DEFAULT_ADDRESS", "AsyncClient", "SyncClient"]

logger = logging.getLogger("django_message_broker.client")
_C = TypeVar("_C", bound="_ClientBase")
#: Guards building and dropping cores (rare), for every client: a lock of
#: the client's own could be held by a parent thread at fork() and would
#: then never be released in the child.
_shared_lock = threading.Lock()
_shared_cores: dict[ClientOptions, list] = {}  # options -> [core, number of clients using it]


_D = ClientOptions()  # the defaults


def _forget_parent_state() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared_cores.clear()


os.register_at_fork(after_in_child=_forget_parent_state)


class _ClientBase:
    """Options: see ``options.ClientOptions`` (each is checked here:
    ``TypeError`` for a wrong type, ``ValueError`` for a bad value).
    ``shared``: clients with equal options share one connection per process."""

    def __init__(
        self,
        address: str = _D.address,
        *,
        timeout: float = _D.timeout,
        heartbeat: float = _D.heartbeat,
        prefetch: int = _D.prefetch,
        process_prefetch: int = _D.process_prefetch,
        idle_return: float = _D.idle_return,
        embedded: bool = _D.embedded,
        embedded_idle_timeout: float = _D.embedded_idle_timeout,
        embedded_max_memory: Optional[int] = _D.embedded_max_memory,
        max_message_size: int = _D.max_message_size,
        server_key: Optional[str] = _D.server_key,
        client_key: Optional[str] = _D.client_key,
        shared: bool = False,
        **unknown: NoReturn,  # a typo: a TypeError here (with a suggestion), and for mypy
    ) -> None:
        owner = type(self).__name__
        if unknown:
            raise unknown_option(owner, next(iter(unknown)), (*CLIENT_KEYS, "shared"))
        self.options = ClientOptions.checked(
            owner,
            address=address,
            timeout=timeout,
            heartbeat=heartbeat,
            prefetch=prefetch,
            process_prefetch=process_prefetch,
            idle_return=idle_return,
            embedded=embedded,
            embedded_idle_timeout=embedded_idle_timeout,
            embedded_max_memory=embedded_max_memory,
            max_message_size=max_message_size,
            server_key=server_key,
            client_key=client_key,
        )
        if not isinstance(shared, bool):
            raise TypeError(f"{owner} option 'shared' must be True or False, not {type(shared).__name__}: {shared!r}")
        # CURVE (docs/security.md): the key files are read now, so that a
        # missing or unreadable one fails here rather than at first use.
        client_curve(self.options.server_key, self.options.client_key)
        self.address = self.options.address
        self.timeout = self.options.timeout
        self.embedded = self.options.embedded
        # Shared clients with the same settings use one connection per process,
        # so that their messages keep one order on one pipe.
        self._shared_key: Optional[ClientOptions] = self.options if shared else None
        self._core: Optional[Core] = None
        self._origin: Optional[_ClientBase] = None  # set on a twin: the client whose core it uses
        self._closed = False

    @property
    def core(self) -> Core:
        """This client's connection, made on first use (and again in a
        forked child: the parent's is not the child's to use)."""
        if self._origin is not None:
            return self._origin.core
        core = self._core
        if core is None or core.inherited:
            with _shared_lock:
                if self._closed:
                    raise ClientClosed("the client is closed")
                core = self._core
                if core is None or core.inherited:
                    key = self._shared_key
                    if key is None:
                        core = self._new_core()
                    else:
                        entry = _shared_cores.get(key)
                        if entry is None or entry[0].closed:
                            entry = _shared_cores[key] = [self._new_core(), 0]
                        entry[1] += 1
                        core = entry[0]
                    self._core = core
        return core

    def _new_core(self) -> Core:
        options = self.options
        on_unreachable: Optional[Callable[[str], None]] = None
        if options.embedded:
            from ..embedded import ensure_broker

            def on_unreachable(address: str) -> None:
                # On a thread of its own: a failure is logged, and the calls
                # waiting for a broker raise BrokerUnavailable at their timeout.
                try:
                    ensure_broker(
                        address,
                        idle_timeout=options.embedded_idle_timeout,
                        max_body=options.max_message_size,
                        max_memory=options.embedded_max_memory,
                        server_key=options.server_key,
                        client_key=options.client_key,
                    )
                except Exception as exc:
                    logger.error("could not start an embedded broker at %s: %s", address, exc)

        return Core(
            options.address,
            timeout=options.timeout,
            heartbeat=options.heartbeat,
            prefetch=options.prefetch,
            process_prefetch=options.process_prefetch,
            idle_return=options.idle_return,
            max_message_size=options.max_message_size,
            on_unreachable=on_unreachable,
            server_key=options.server_key,
            client_key=options.client_key,
        )

    def twin(self, cls: type[_C]) -> _C:
        """A client of another kind (``AsyncClient``/``SyncClient``) sharing
        this one's connection, receive buffers and send window, now and
        after a fork. Closing either closes both."""
        origin = self._origin or self
        other = cls.__new__(cls)
        other.__dict__.update(origin.__dict__)
        other._origin = origin
        other._core = None
        return other

    @property
    def client_id(self) -> str:
        """Unique per client (random, not affected by ``random.seed``)."""
        return self.core.client_id

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until the broker has answered (or ``timeout`` passes)."""
        return self.core.wait_connected(self.timeout if timeout is None else check_timeout("timeout", timeout))

    def close(self) -> None:
        """Send what is queued, leave the broker, stop the I/O thread."""
        if self._origin is not None:
            self._origin.close()
            return
        with _shared_lock:
            self._closed = True
            core, self._core = self._core, None
        if core is None or core.inherited:
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
    def _check_body(self, core: Core, body: Any) -> bytes:
        """The body as bytes, checked here, in the caller: a body the I/O
        thread cannot send must never reach it. The limit is the smaller of
        ours (``max_message_size``) and the broker's (its Hello reply)."""
        if type(body) is not bytes:
            if not isinstance(body, (bytes, bytearray, memoryview)):
                raise TypeError(f"a message body must be bytes, not {type(body).__name__}")
            body = bytes(body)
        limit = min(core.max_body, self.options.max_message_size)
        if len(body) > limit:
            raise MessageTooLarge(len(body), limit)
        return body

    def fetch_ahead(self, channel: str) -> None:
        """Start fetching ``channel``'s messages ahead of its first receive,
        as a receive would: a process channel (``!``) this process is about
        to read (the Channels layer does this in ``new_channel``). If no
        receive comes within ``idle_return`` seconds, they go back to the
        broker. Does not wait."""
        p.check_channel_name(channel)
        self.core.fetch_ahead(channel)

    def _send_now_or_request(self, channel: str, body: bytes, ttl: float, capacity: int) -> tuple[Core, Any, bytes]:
        """Check a send; pipeline it if the rules allow (returns no request),
        else return the checked ``Send`` to wait for, and the body."""
        p.check_channel_name(channel)
        ttl = check_ttl("ttl", ttl)
        capacity = check_capacity("capacity", capacity)
        core = self.core
        body = self._check_body(core, body)
        if core.may_pipeline(channel, capacity):  # the rule: _state.SendWindow
            core.send_pipelined(channel, body, ttl, capacity)
            return core, None, body
        return core, p.Send(0, channel, ttl, capacity, True), body

    def _group_send(
        self,
        group: str,
        body: bytes,
        ttl: float,
        capacity: int,
        capacities: Sequence[tuple[str, int]],
        prefix: str,
        on_skipped: Optional[Callable[[int, int], None]] = None,
        *,
        pipelined: bool = False,
    ) -> tuple[Optional[p.GroupSend], bytes, Callable[[Any], tuple[int, int]]]:
        """Check a group_send. ``pipelined``: send it now if the send window
        allows (returns no request); else return the ``GroupSend`` to wait
        for, its body, and what to make of the answer."""
        p.check_group_name(group)
        ttl = check_ttl("ttl", ttl)
        capacity = check_capacity("capacity", capacity)
        rules = _check_capacities(capacities)
        p.check_prefix(prefix)
        core = self.core
        body = self._check_body(core, body)

        def answered(value: Any) -> tuple[int, int]:
            core.answered()
            sent, skipped = value
            if skipped and on_skipped is not None:
                on_skipped(sent, skipped)
            return sent, skipped

        msg = p.GroupSend(0, group, ttl, capacity, rules, prefix)
        if pipelined and core.may_pipeline_group():  # the rule: _state.SendWindow
            core.group_send_pipelined(msg, body, answered)
            return None, body, answered
        return msg, body, answered

    def _send_failed(self, core: Core, channel: str, capacity: int, error: BaseException) -> None:
        core.refused(channel, capacity, isinstance(error, QueueFull))

    def _record_depth(self, core: Core, channel: str) -> Callable[[Any], None]:
        def record(depth: Any) -> None:
            core.acked(channel, int(depth))

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
        core, msg, body = self._send_now_or_request(channel, body, ttl, capacity)
        if msg is None:
            return
        try:
            await self._request(msg, body, self._record_depth(core, channel))
        except BaseException as error:
            self._send_failed(core, channel, capacity, error)
            raise

    async def receive(self, channel: str) -> bytes:
        """The next message of ``channel``. Cancelling loses nothing."""
        return (await self.receive_item(channel))[0]

    async def receive_item(self, channel: str) -> Item:
        """``receive``, with what the layer needs to decode a body once for
        every channel of this process it was delivered to: ``(body,
        deadline, shared)``, ``shared`` being the body's ``Shared`` slot
        (``client._state``) or None."""
        p.check_channel_name(channel)
        core = self.core
        item, waiter = core.take(channel, lambda state: AsyncWaiter(core, state))
        if item is not None:
            return item
        assert waiter is not None
        try:
            item = await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                core.put_back(channel, future.result())  # resolved as we were cancelled
            else:
                core.forget_waiter(channel, waiter)
            raise
        return item  # type: ignore[no-any-return]

    async def group_add(self, group: str, channel: str, *, ttl: float = 86400.0) -> None:
        msg = _group_add(group, channel, ttl)
        await self._request(msg)
        self.core.remember_group(group, channel, msg.ttl)

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
        prefix: str = "",
    ) -> tuple[int, int]:
        """Send to every member; full members are skipped. ``capacities``:
        (regex, capacity) rules for members, first match wins; with
        ``prefix``, they are matched against member names without
        ``prefix.`` (see ``protocol.GroupSend``). Returns
        ``(delivered, skipped)``."""
        msg, body, answered = self._group_send(group, body, ttl, capacity, capacities, prefix)
        assert msg is not None
        return await self._request(msg, body, answered)  # type: ignore[no-any-return]

    async def group_send_pipelined(
        self,
        group: str,
        body: bytes,
        *,
        ttl: float = 60.0,
        capacity: int = 100,
        capacities: Sequence[tuple[str, int]] = (),
        prefix: str = "",
        on_skipped: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        """``group_send`` that returns as soon as the message is on its way,
        as a ``send`` does, while fewer than ``MAX_GROUPS_AHEAD`` are
        unanswered (else, or without a connection, it waits for the
        broker's answer). A producer then does not wait a round trip per
        group_send; the Channels layer sends this way.
        ``on_skipped(delivered, skipped)`` runs on the client's I/O thread
        when the answer says members were skipped (the broker logs them
        too); a refusal, or no answer within the timeout, is logged."""
        msg, body, answered = self._group_send(
            group, body, ttl, capacity, capacities, prefix, on_skipped, pipelined=True
        )
        if msg is not None:
            await self._request(msg, body, answered)

    async def flush(self, prefix: str = "") -> None:
        """Drop every queued message and group on the broker, or only those
        of namespace ``prefix`` (names ``prefix.*``)."""
        await self._request(p.Flush(0, p.check_prefix(prefix)))

    async def stats(self, top: int = 0) -> dict[str, Any]:
        """The broker's counters: a flat dict; with ``top`` > 0 the detailed
        form (totals, rates, the ``top`` deepest channels, clients; see
        docs/operations.md)."""
        return await self._request(p.Stats(0, _check_top(top)))  # type: ignore[no-any-return]


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
        return waiter.wait(core.lock, None)  # the core times requests out

    def send(self, channel: str, body: bytes, *, ttl: float = 60.0, capacity: int = 100) -> None:
        """As ``AsyncClient.send``, blocking."""
        core, msg, body = self._send_now_or_request(channel, body, ttl, capacity)
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
        return self.receive_item(channel, timeout)[0]

    def receive_item(self, channel: str, timeout: Optional[float] = None) -> Item:
        """``receive``, as ``AsyncClient.receive_item`` (body, deadline, shared)."""
        p.check_channel_name(channel)
        if timeout is not None:
            timeout = check_timeout("timeout", timeout)
        core = self.core
        item, waiter = core.take(channel, SyncWaiter)
        if item is None:
            assert waiter is not None
            try:
                item = waiter.wait(core.lock, timeout)
            except TimeoutError:
                core.forget_waiter(channel, waiter)
                raise
        return item  # type: ignore[no-any-return]

    def group_add(self, group: str, channel: str, *, ttl: float = 86400.0) -> None:
        msg = _group_add(group, channel, ttl)
        self._request(msg)
        self.core.remember_group(group, channel, msg.ttl)

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
        prefix: str = "",
    ) -> tuple[int, int]:
        """As ``AsyncClient.group_send``, blocking."""
        msg, body, answered = self._group_send(group, body, ttl, capacity, capacities, prefix)
        assert msg is not None
        return self._request(msg, body, answered)  # type: ignore[no-any-return]

    def group_send_pipelined(
        self,
        group: str,
        body: bytes,
        *,
        ttl: float = 60.0,
        capacity: int = 100,
        capacities: Sequence[tuple[str, int]] = (),
        prefix: str = "",
        on_skipped: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        """As ``AsyncClient.group_send_pipelined``, blocking only when it
        must wait for the broker's answer."""
        msg, body, answered = self._group_send(
            group, body, ttl, capacity, capacities, prefix, on_skipped, pipelined=True
        )
        if msg is not None:
            self._request(msg, body, answered)

    def flush(self, prefix: str = "") -> None:
        self._request(p.Flush(0, p.check_prefix(prefix)))

    def stats(self, top: int = 0) -> dict[str, Any]:
        """As ``AsyncClient.stats``, blocking."""
        return self._request(p.Stats(0, _check_top(top)))  # type: ignore[no-any-return]


def _check_top(top: Any) -> int:
    if isinstance(top, bool) or not isinstance(top, int):
        raise TypeError(f"stats top must be an int, not {type(top).__name__}")
    if top < 0:
        raise ValueError(f"stats top must be >= 0, not {top}")
    return top


def _group_add(group: str, channel: str, ttl: float) -> p.GroupAdd:
    p.check_group_name(group)
    p.check_channel_name(channel)
    return p.GroupAdd(0, group, channel, check_ttl("ttl", ttl))


def _group_discard(group: str, channel: str) -> p.GroupDiscard:
    p.check_group_name(group)
    p.check_channel_name(channel)
    return p.GroupDiscard(0, group, channel)


def _check_capacities(capacities: Any) -> list[tuple[str, int]]:
    """``group_send``'s (regex, capacity) rules, checked in the caller."""
    if isinstance(capacities, (str, bytes)) or not isinstance(capacities, Sequence):
        raise TypeError(f"capacities must be a sequence of (regex, capacity) pairs, not {type(capacities).__name__}")
    rules = []
    for rule in capacities:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise TypeError(f"capacities: each rule must be a (regex str, capacity) pair, not {rule!r}")
        rules.append((rule[0], check_capacity(f"capacities[{rule[0]!r}]", rule[1])))
    return rules
