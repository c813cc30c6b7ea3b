"""Requests in flight: numbered, remembered until answered or timed out, and
held in order while no connection is up. No I/O: the driver sends.

How it works. Every request gets the next number (``number``). A request
the driver sent is remembered (``sent``) until its reply (``pop``) or its
deadline (``expired``). One that could not go out waits in the backlog
(``hold``), in order, until ``drain`` finds a connection; past
``max_backlog`` the oldest is dropped. Untracked requests are pipelined
sends: the broker answers them only to refuse, so they are remembered only
while they wait in the backlog. Used on the I/O thread only.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Optional

__all__ = ["Request", "Requests"]


class Request:
    __slots__ = ("deadline", "frames", "on_reply", "sent", "track", "waiter")

    def __init__(
        self, waiter: Any, deadline: float, on_reply: Optional[Callable[[Any], Any]], frames: list, track: bool
    ) -> None:
        self.waiter = waiter  # resolved with the answer; None: nobody waits
        self.deadline = deadline
        self.on_reply = on_reply  # transforms the answer's value (or raises)
        self.frames = frames  # while in the backlog
        self.sent = not frames
        self.track = track


class Requests:
    def __init__(self, max_backlog: int) -> None:
        self.max_backlog = max_backlog
        self._numbers = itertools.count(1)
        self.pending: dict[int, Request] = {}
        self.backlog: deque[int] = deque()  # requests not yet on the wire (no connection)

    def number(self) -> int:
        return next(self._numbers)

    def __contains__(self, req: int) -> bool:
        return req in self.pending

    def sent(self, req: int, waiter: Any, on_reply: Optional[Callable[[Any], Any]], deadline: float) -> None:
        """A tracked request went out: wait for its answer until ``deadline``."""
        self.pending[req] = Request(waiter, deadline, on_reply, [], True)

    def hold(
        self,
        req: int,
        frames: list,
        waiter: Any,
        on_reply: Optional[Callable[[Any], Any]],
        deadline: float,
        track: bool,
        first: bool,
    ) -> Optional[int]:
        """No connection: keep the request in the backlog (at its head if
        ``first``). Returns a request to drop when the backlog overflows."""
        self.pending[req] = Request(waiter, deadline, on_reply, frames, track)
        self.backlog.appendleft(req) if first else self.backlog.append(req)
        if len(self.backlog) > self.max_backlog:
            return self.backlog.popleft()
        return None

    def drain(self, send: Callable[[list], bool]) -> None:
        """Send the backlog, in order, until ``send`` finds no connection."""
        backlog = self.backlog
        while backlog:
            req = backlog[0]
            request = self.pending.get(req)
            if request is None or request.sent:
                backlog.popleft()
                continue
            if not send(request.frames):
                return
            request.sent = True
            request.frames = []
            backlog.popleft()
            if not request.track:
                del self.pending[req]

    def pop(self, req: int) -> Optional[Request]:
        return self.pending.pop(req, None)

    def expired(self, now: float) -> list[int]:
        return [req for req, request in self.pending.items() if request.deadline <= now]

    def internal(self) -> list[int]:
        """The client's own requests (hellos, heartbeats): nobody waits on
        them, and they are pointless to a peer that is gone."""
        return [req for req, r in self.pending.items() if r.waiter is None and r.on_reply is not None]

    def clear(self) -> list[Request]:
        """Forget everything (to fail it)."""
        requests = list(self.pending.values())
        self.pending = {}
        self.backlog.clear()
        return requests
