"""Waiters: how a result reaches a caller on another thread or event loop.

An ``AsyncWaiter`` is a future on the caller's loop. The client's I/O thread
resolves it (with the client lock held) through its ``Hub``, which runs the
outcome on that loop in a batch; a receive's outcome is decided there, where
cancellation happens, and reported back with ``Hub.settled``. A
``SyncWaiter`` is a slot a blocked thread waits on.

Both meet ``client._state.Waiter``, the protocol the pure state needs. They
know the channel's state object and the hub, not the client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, ContextManager, Optional, Protocol

from ..exceptions import ClientClosed
from ._state import ChannelState, Item

__all__ = ["AsyncWaiter", "Hub", "LoggingWaiter", "SyncWaiter", "Waiter"]

logger = logging.getLogger("django_message_broker.client")


class Hub(Protocol):
    """What a waiter needs from the client that resolves it."""

    def schedule(self, waiter: AsyncWaiter, value: Any, error: Optional[BaseException]) -> None:
        """Run ``waiter.settle(value, error)`` on its loop, soon (lock held)."""

    def settled(self, channel: ChannelState, item: Item, accepted: bool) -> None:
        """A receive's hand-off ended: it took ``item``, or not (it was
        cancelled or its loop is gone) and ``item`` goes back first in line."""

    def settled_all(self, outcomes: list[tuple[ChannelState, Item, bool]]) -> None:
        """``settled`` for each of ``outcomes``, in order (a loop's batch)."""


class AsyncWaiter:
    """A result for a coroutine on ``loop``. ``resolve`` is called on the I/O
    thread with the client lock held; the outcome is decided on the loop."""

    __slots__ = ("channel", "future", "hub", "loop")

    #: A delivery's outcome is decided later, on the loop (see ``settle``).
    settles_later = True

    def __init__(self, hub: Hub, channel: Optional[ChannelState] = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future = self.loop.create_future()
        self.hub = hub
        self.channel = channel  # set for receives: where to put a message back

    def alive(self) -> bool:
        return not self.future.done()

    def resolve(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self.hub.schedule(self, value, error)

    def settle(self, value: Any, error: Optional[BaseException]) -> None:
        """On the loop: the outcome. A receive that was cancelled meanwhile
        does not take its message: the hub puts it back."""
        accepted = self.outcome(value, error)
        if accepted is not None:
            assert self.channel is not None
            self.hub.settled(self.channel, value, accepted)

    def outcome(self, value: Any, error: Optional[BaseException]) -> Optional[bool]:
        """``settle`` without telling the hub: resolve the future (on the
        loop) and return whether a receive took its message (None: not a
        receive's hand-off, nothing to tell). The caller tells the hub, for
        a batch at once (``Hub.settled_all``)."""
        future = self.future
        if error is not None or self.channel is None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(value)
            return None
        accepted = not future.done()
        if accepted:
            future.set_result(value)
        return accepted

    def undeliverable(self, value: Any, error: Optional[BaseException]) -> None:
        """The loop is gone (closed): a message goes back (lock held)."""
        if error is None and self.channel is not None:
            self.hub.settled(self.channel, value, False)


class SyncWaiter:
    """A result for a blocked thread. Resolved under the client lock."""

    __slots__ = ("abandoned", "channel", "error", "event", "value")

    #: Resolved under the client lock, where a timed-out wait checks too:
    #: once resolved, the thread has the message.
    settles_later = False

    def __init__(self, channel: Optional[ChannelState] = None) -> None:
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

    def wait(self, lock: ContextManager[Any], timeout: Optional[float]) -> Any:
        """The result; ``TimeoutError`` after ``timeout`` seconds. ``lock``
        is the client's: a result that arrives as we time out is ours."""
        if not self.event.wait(timeout):
            with lock:
                if not self.event.is_set():
                    self.abandoned = True
                    raise TimeoutError(f"no result within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value


class LoggingWaiter:
    """The outcome of a request nobody waits for (a pipelined group_send):
    ``done()`` is called (lock held), and an error is logged, since no
    caller will see it. Closing the client is not one: close sends what is
    queued, as for pipelined sends, and only the answer is not awaited."""

    __slots__ = ("done", "what")

    settles_later = False

    def __init__(self, what: str, done: Callable[[], None]) -> None:
        self.what = what
        self.done = done

    def alive(self) -> bool:
        return True

    def resolve(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self.done()
        if error is not None and not isinstance(error, ClientClosed):
            logger.error("a pipelined %s failed: %s", self.what, error)


Waiter = AsyncWaiter | SyncWaiter | LoggingWaiter
