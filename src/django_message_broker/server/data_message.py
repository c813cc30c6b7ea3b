"""The message the broker queues: an opaque body and its deadline."""

from __future__ import annotations

import math
from typing import Any

from .._memory import MESSAGE_OVERHEAD

__all__ = ["DataMessage"]


class DataMessage:
    """One queued message.

    ``body`` is whatever arrived on the wire (a ``zmq.Frame`` in the broker,
    ``bytes`` in tests): it is never decoded or copied, and one body object
    may sit in many queues at once after a group fan-out. ``deadline`` is a
    monotonic time set by ``ChannelQueue.push``; ``math.inf`` never expires.
    ``size`` is what the message counts against the broker's memory limit:
    its body's length plus a fixed ``MESSAGE_OVERHEAD``.
    """

    __slots__ = ("body", "deadline", "size")

    def __init__(self, body: Any = b"", deadline: float = math.inf) -> None:
        self.body = body
        self.deadline = deadline
        self.size = len(self) + MESSAGE_OVERHEAD

    def __len__(self) -> int:
        body = self.body
        return len(body.buffer) if hasattr(body, "buffer") else len(body)

    def __repr__(self) -> str:
        return f"DataMessage({len(self)} bytes, deadline={self.deadline:g})"
