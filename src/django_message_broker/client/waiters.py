"""Waiters: how a result reaches a caller on another thread or event loop.

An ``AsyncWaiter`` is a future on the caller's loop: the client's I/O thread
resolves it (with the client lock held) by scheduling a call on that loop,
and the outcome of a receive is decided there, where cancellation happens.
A ``SyncWaiter`` is a slot a blocked thread waits on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .core import Core

__all__ = ["AsyncWaiter", "SyncWaiter", "Waiter"]


class AsyncWaiter:
    """A result for a coroutine on ``loop``. ``resolve`` is called on the I/O
    thread with the client lock held; the outcome is decided on the loop."""

    __slots__ = ("channel", "core", "future", "loop")

    #: A delivery's outcome is decided later, on the loop (see ``_settle``).
    settles_later = True

    def __init__(self, core: Core, channel: Optional[str] = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future = self.loop.create_future()
        self.core = core
        self.channel = channel  # set for receives: where to put a message back

    def alive(self) -> bool:
        return not self.future.done()

    def resolve(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        if error is None and self.channel is not None:
            # A message is on its way to this receive: until the loop has
            # decided whether the receive still wants it, later messages of
            # the channel must wait behind it (see Core.take).
            self.core._state(self.channel).handoffs += 1
        self.core._schedule(self.loop, self._settle, value, error)

    def _settle(self, value: Any, error: Optional[BaseException]) -> None:
        if error is not None or self.channel is None:
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(value)
            return
        self.core._settle_handoff(self.channel, value, self.future)

    def undeliverable(self, value: Any) -> None:
        """The loop is gone (closed): put the message back (lock held)."""
        if self.channel is not None:
            state = self.core._state(self.channel)
            state.handoffs -= 1
            state.buffer.appendleft(value)
            self.core._feed(state)


class SyncWaiter:
    """A result for a blocked thread. Resolved under the client lock."""

    __slots__ = ("abandoned", "channel", "error", "event", "value")

    #: Resolved under the client lock, where a timed-out wait checks too:
    #: once resolved, the thread has the message.
    settles_later = False

    def __init__(self, channel: Optional[str] = None) -> None:
        self.event = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.abandoned = False
        self.channel = channel

    def alive(self) -> bool:
        return not self.abandoned and not self.event.is_set()

    def resolve(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self.value, self.error = value, error
        self.event.set()

    def wait(self, core: Core, timeout: Optional[float]) -> Any:
        if not self.event.wait(timeout):
            with core._lock:
                if not self.event.is_set():
                    self.abandoned = True
                    raise TimeoutError(f"no result within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value


Waiter = Any  # AsyncWaiter | SyncWaiter
