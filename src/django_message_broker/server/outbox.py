"""Deliveries collected per peer and sent as few messages as possible.

How it works. While the broker handles a batch of input, ``ChannelQueue``
hands each run of deliveries to the outbox (``defer``) instead of sending
it: the outbox stands in for the ROUTER socket as the endpoints' ``socket``.
``flush`` then sends each peer one ``Deliver`` per ``MAX_BATCH`` messages,
whatever channels they belong to: a group_send to 500 channels of one
process costs one ZeroMQ message, not 500. Before the broker sends a peer
anything else (a reply, a notice) it flushes that peer's deliveries, so the
peer sees everything in the order the broker decided it.

A peer that is busy (its pipe at the high-water mark) or gone gets its runs
put back at the head of their queues, in order, with their credit restored
(busy) or their endpoint dropped (gone); ``flush`` returns the queues to
retry.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from .. import protocol as p
from .data_message import DataMessage
from .server_queue import ChannelQueue, Endpoint

__all__ = ["Outbox"]

logger = logging.getLogger("django_message_broker.server")

_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)

_Run = tuple[ChannelQueue, Endpoint, list[DataMessage]]


class Outbox:
    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self._pending: dict[bytes, list[_Run]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def defer(self, queue: ChannelQueue, endpoint: Endpoint, messages: list[DataMessage]) -> None:
        """Take a run of deliveries for ``endpoint`` (called by ChannelQueue)."""
        runs = self._pending.get(endpoint.dealer[0])
        if runs is None:
            self._pending[endpoint.dealer[0]] = [(queue, endpoint, messages)]
        else:
            runs.append((queue, endpoint, messages))

    def flush(self, now: float) -> tuple[int, set[ChannelQueue]]:
        """Send everything pending. Returns (messages sent, queues to retry)."""
        pending, self._pending = self._pending, {}
        sent, retry = 0, set()
        for ident, runs in pending.items():
            count, failed = self._send_runs(ident, runs, now)
            sent += count
            retry |= failed
        return sent, retry

    def flush_peer(self, ident: bytes, now: float) -> tuple[int, set[ChannelQueue]]:
        runs = self._pending.pop(ident, None)
        if runs is None:
            return 0, set()
        return self._send_runs(ident, runs, now)

    def _send_runs(self, ident: bytes, runs: list[_Run], now: float) -> tuple[int, set[ChannelQueue]]:
        sent = 0
        start = 0
        while start < len(runs):
            end, size = start, 0
            while end < len(runs) and (end == start or size + len(runs[end][2]) <= p.MAX_BATCH):
                size += len(runs[end][2])
                end += 1
            outcome = self._send(ident, runs[start:end], now)
            if outcome is not None:
                return sent, self._put_back(runs[start:], outcome)
            sent += size
            start = end
        return sent, set()

    def _send(self, ident: bytes, runs: list[_Run], now: float) -> int | None:
        """One Deliver; None if it went, else the errno that stopped it."""
        if len(runs) == 1:  # one channel: the compact form
            queue, _, messages = runs[0]
            header = p.Deliver(queue.name, [m.deadline - now for m in messages])
            bodies = [m.body for m in messages]
        else:
            channels, ttls, bodies = [], [], []
            for queue, _, messages in runs:
                for message in messages:
                    channels.append(queue.name)
                    ttls.append(message.deadline - now)
                    bodies.append(message.body)
            header = p.Deliver("", ttls, channels)
        send = self.socket.send
        try:
            send(ident, _MORE_NOBLOCK)  # with ROUTER_MANDATORY only this frame can fail
            send(p.encode(header), _MORE_NOBLOCK)
            last = len(bodies) - 1
            for i, body in enumerate(bodies):
                send(body, _NOBLOCK if i == last else _MORE_NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                return exc.errno
            raise
        return None

    @staticmethod
    def _put_back(runs: list[_Run], errno: int) -> set[ChannelQueue]:
        """Runs that did not go: back to the head of their queues, in order."""
        for queue, endpoint, messages in reversed(runs):
            queue.put_back(messages)
            queue.release(endpoint, len(messages))
            if errno == zmq.EHOSTUNREACH:
                queue.subscribers.pop(endpoint.id, None)
            elif endpoint.credit is not None:
                endpoint.credit += len(messages)
        return {queue for queue, _, _ in runs}
