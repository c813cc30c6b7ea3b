"""The broker's outgoing buffer: per peer, replies and deliveries in decided order.

How it works. While the broker handles input it appends to one list per
peer: a reply (an encoded header, ``reply``) or a run of deliveries that a
``ChannelQueue`` hands over (``defer``: the outbox is the queues' *sink*).
``take`` turns the lists into ZeroMQ messages, in order: consecutive runs
become one ``Deliver`` per ``MAX_BATCH`` bodies whatever channels they
belong to (a group_send to 500 channels of one process costs one message,
not 500), and each reply is its own message. So a peer sees everything in
the order the broker decided it, and the shell sends what it is given
(``Broker.data_to_send``). ``take(replies_only=True)`` takes only the peers
that were sent a reply since the last take: the shell sends those after
each message it handles, and the rest once per read batch. Nothing here
does I/O.

Task deliveries (``task``: see ``tasks.py``) coalesce the same way into one
``TaskDeliver`` per ``MAX_BATCH``; a reply may carry a task message too
(``reply_frames``: the answer to a ``Get``).

Shared bodies. A group_send puts one body object in every member's
queue. For a peer that reads ``Deliver.body_of`` (its Hello said
``shared_bodies``: ``Outbox.shared``), a Deliver carries each distinct body
object once, and ``body_of`` says which body each message has: a
group_send to 500 channels of one process sends one body, not 500 copies.
Everything else (runs, held counts, credit, requeue) stays per message.

An ``Outgoing`` remembers the runs and task deliveries it carries, so that
a send that fails can give them back to their queues (``Broker.send_failed``,
``ChannelQueue.requeue`` and ``Tasks.undeliver``).
"""

from __future__ import annotations

from typing import Any

from .. import protocol as p
from .data_message import DataMessage
from .server_queue import ChannelQueue, Endpoint
from .tasks import Delivery

__all__ = ["Outbox", "Outgoing"]

_Run = tuple[ChannelQueue, Endpoint, list[DataMessage]]


class Outgoing:
    """One ZeroMQ message for one peer: ``[ident, *frames]`` on the ROUTER.
    ``frames`` is the header and then the bodies; ``runs`` the deliveries it
    carries (empty for a reply or a notice), ``tasks`` its task deliveries,
    ``count`` how many messages it delivers (not frames: bodies may be
    shared; by default one per task delivery)."""

    __slots__ = ("count", "frames", "ident", "runs", "tasks")

    def __init__(
        self,
        ident: bytes,
        frames: list[Any],
        runs: tuple[_Run, ...] | list[_Run] = (),
        tasks: tuple[Delivery, ...] | list[Delivery] = (),
        count: int | None = None,
    ) -> None:
        self.ident = ident
        self.frames = frames
        self.runs = runs
        self.tasks = tasks
        self.count = len(tasks) if count is None else count

    def __repr__(self) -> str:
        kind = "Deliver" if self.runs else "TaskDeliver" if self.tasks else "reply"
        return f"<Outgoing {kind} to {self.ident!r}: {len(self.frames)} frame(s)>"


class Outbox:
    def __init__(self) -> None:
        #: peer -> what it is to be sent: header bytes (a reply) or a run
        self._peers: dict[bytes, list[Any]] = {}
        #: Peers sent a reply or notice since the last ``take``.
        self.replied: set[bytes] = set()
        #: Peers that read ``Deliver.body_of``: they get a shared body once.
        self.shared: set[bytes] = set()

    def __bool__(self) -> bool:
        return bool(self._peers)

    def reply(self, ident: bytes, header: bytes) -> None:
        """Queue an encoded header (a reply or a notice) for ``ident``."""
        self.replied.add(ident)
        items = self._peers.get(ident)
        if items is None:
            self._peers[ident] = [header]
        else:
            items.append(header)

    def reply_frames(self, ident: bytes, frames: list[Any], tasks: list[Delivery]) -> None:
        """Queue a reply with body frames (carrying ``tasks``) for ``ident``."""
        self.replied.add(ident)
        self._peers.setdefault(ident, []).append(Outgoing(ident, frames, (), tasks))

    def task(self, ident: bytes, delivery: Delivery) -> None:
        """Take a task delivery for ``ident`` (the task queues' sink)."""
        items = self._peers.get(ident)
        if items is None:
            self._peers[ident] = [delivery]
        else:
            items.append(delivery)

    def defer(self, queue: ChannelQueue, endpoint: Endpoint, messages: list[DataMessage]) -> None:
        """Take a run of deliveries for ``endpoint`` (the queues' sink)."""
        ident = endpoint.dealer[0]
        items = self._peers.get(ident)
        if items is None:
            self._peers[ident] = [(queue, endpoint, messages)]
        else:
            items.append((queue, endpoint, messages))

    def take(self, now: float, *, replies_only: bool = False) -> list[list[Outgoing]]:
        """What is buffered, as messages: one list per peer, in order; those
        peers' buffers are empty afterwards. ``replies_only``: only the peers
        sent a reply or notice since the last take (their whole list, so
        their order holds); the others wait for the end of the batch, where
        their deliveries coalesce."""
        replied, self.replied = self.replied, set()
        shared = self.shared
        if replies_only:
            pop = self._peers.pop
            return [_messages(ident, pop(ident), now, shared) for ident in replied]
        peers, self._peers = self._peers, {}
        return [_messages(ident, items, now, shared) for ident, items in peers.items()]


def _messages(ident: bytes, items: list[Any], now: float, shared: set[bytes]) -> list[Outgoing]:
    out: list[Outgoing] = []
    runs: list[_Run] = []
    tasks: list[Delivery] = []
    size = 0
    for item in items:
        if type(item) is Delivery:
            if runs:
                out.append(_deliver(ident, runs, now, shared))
                runs, size = [], 0
            tasks.append(item)
            if len(tasks) == p.MAX_BATCH:
                out.append(_task_deliver(ident, tasks))
                tasks = []
            continue
        if tasks:
            out.append(_task_deliver(ident, tasks))
            tasks = []
        if type(item) is tuple:
            if runs and size + len(item[2]) > p.MAX_BATCH:
                out.append(_deliver(ident, runs, now, shared))
                runs, size = [], 0
            runs.append(item)
            size += len(item[2])
        else:
            if runs:
                out.append(_deliver(ident, runs, now, shared))
                runs, size = [], 0
            out.append(item if type(item) is Outgoing else Outgoing(ident, [item]))
    if runs:
        out.append(_deliver(ident, runs, now, shared))
    if tasks:
        out.append(_task_deliver(ident, tasks))
    return out


def _task_deliver(ident: bytes, tasks: list[Delivery]) -> Outgoing:
    header = p.TaskDeliver(
        [d.session.id for d in tasks],
        [d.consumer for d in tasks],
        [d.tag for d in tasks],
        [d.message.redelivered for d in tasks],
    )
    return Outgoing(ident, [p.encode(header), *[d.body for d in tasks]], (), tasks)


def _deliver(ident: bytes, runs: list[_Run], now: float, shared: set[bytes]) -> Outgoing:
    """One Deliver for ``runs``: the compact form for one channel; for many,
    each distinct body once if the peer takes ``body_of`` (it is in ``shared``)."""
    if len(runs) == 1:
        queue, _, messages = runs[0]
        header = p.Deliver(queue.name, [m.deadline - now for m in messages])
        frames: list[Any] = [p.encode(header)]
        frames.extend([m.body for m in messages])
        return Outgoing(ident, frames, runs, (), len(messages))
    channels: list[str] = []
    ttls: list[float] = []
    if ident not in shared:
        bodies = []
        for queue, _, messages in runs:
            name = queue.name
            for message in messages:
                channels.append(name)
                ttls.append(message.deadline - now)
                bodies.append(message.body)
        return Outgoing(ident, [p.encode(p.Deliver("", ttls, channels)), *bodies], runs, (), len(bodies))
    # One frame per distinct body object: a group_send's members share one,
    # and come one after the other (hence the cheap ``is`` before the dict).
    unique: list[Any] = []
    body_of: list[int] = []
    seen: dict[int, int] = {}
    last: Any = None
    at = -1
    for queue, _, messages in runs:
        name = queue.name
        for message in messages:
            channels.append(name)
            ttls.append(message.deadline - now)
            body = message.body
            if body is not last:
                last = body
                at = seen.setdefault(id(body), len(unique))
                if at == len(unique):
                    unique.append(body)
            body_of.append(at)
    if len(unique) == len(body_of):  # nothing shared: the plain form (unique holds every body, in order)
        return Outgoing(ident, [p.encode(p.Deliver("", ttls, channels)), *unique], runs, (), len(unique))
    shared_header = p.encode(p.Deliver("", ttls, channels, body_of))
    return Outgoing(ident, [shared_header, *unique], runs, (), len(body_of))
