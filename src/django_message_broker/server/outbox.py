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

Group runs. A group_send's message to a member whose queue is empty and
whose endpoint has credit goes straight out (``Broker._on_group_send``): it
never enters the queue. Such members of one peer share one ``GroupRun``
(``member``): one message object, and the members' queues and endpoints in
two lists, in place of a list and a run per member. ``take`` splits it
into Delivers of at most ``MAX_BATCH`` messages like any other run, and a
send that fails gives each member its message back (``GroupRun.requeue``).

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


class GroupRun:
    """One message delivered to several channels of one peer at once (a
    group_send's members there): ``queues[i]`` and ``endpoints[i]`` are
    member *i*'s. Each member's credit, ``held`` and counts were taken as
    for a run of one (``Broker._on_group_send``); only the bookkeeping
    objects are shared."""

    __slots__ = ("endpoints", "message", "queues")

    def __init__(self, message: DataMessage) -> None:
        self.message = message
        self.queues: list[ChannelQueue] = []
        self.endpoints: list[Endpoint] = []

    def __len__(self) -> int:
        return len(self.queues)

    def part(self, start: int, stop: int) -> GroupRun:
        """Members ``start:stop`` (a Deliver takes at most ``MAX_BATCH``)."""
        run = GroupRun(self.message)
        run.queues = self.queues[start:stop]
        run.endpoints = self.endpoints[start:stop]
        return run

    def requeue(self, *, gone: bool) -> list[ChannelQueue]:
        """The Deliver did not go: each member's message back to the head of
        its queue (``ChannelQueue.requeue``), the last member first. Returns
        the queues."""
        message = self.message
        for queue, endpoint in zip(reversed(self.queues), reversed(self.endpoints), strict=True):
            queue.requeue(endpoint, [message], gone=gone)
        return self.queues


class Outgoing:
    """One ZeroMQ message for one peer: ``[ident, *frames]`` on the ROUTER.
    ``frames`` is the header and then the bodies; ``runs`` the deliveries it
    carries (``_Run``s and ``GroupRun``s) (empty for a reply or a notice), ``tasks`` its task deliveries,
    ``count`` how many messages it delivers (not frames: bodies may be
    shared; by default one per task delivery)."""

    __slots__ = ("count", "frames", "ident", "runs", "tasks")

    def __init__(
        self,
        ident: bytes,
        frames: list[Any],
        runs: tuple[_Run | GroupRun, ...] | list[_Run | GroupRun] = (),
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
        #: Deliveries taken since the last full ``take`` (the shell sends
        #: them early once there are enough: see ``server._FLUSH_AT``).
        self.deliveries = 0

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
        self.deliveries += len(messages)
        items = self._peers.get(ident)
        if items is None:
            self._peers[ident] = [(queue, endpoint, messages)]
        else:
            items.append((queue, endpoint, messages))

    def member(self, queue: ChannelQueue, endpoint: Endpoint, message: DataMessage) -> None:
        """Take ``message`` for ``endpoint`` (a group_send's member, already
        counted as delivered): it joins the peer's last ``GroupRun`` if that
        one carries the same message, so the order decided holds."""
        ident = endpoint.dealer[0]
        self.deliveries += 1
        items = self._peers.get(ident)
        if items is None:
            run = GroupRun(message)
            self._peers[ident] = [run]
        else:
            run = items[-1]
            if type(run) is not GroupRun or run.message is not message:
                run = GroupRun(message)
                items.append(run)
        run.queues.append(queue)
        run.endpoints.append(endpoint)

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
        self.deliveries = 0
        return [_messages(ident, items, now, shared) for ident, items in peers.items()]


def _messages(ident: bytes, items: list[Any], now: float, shared: set[bytes]) -> list[Outgoing]:
    out: list[Outgoing] = []
    runs: list[_Run | GroupRun] = []
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
        elif type(item) is GroupRun:
            start, total = 0, len(item)
            while start < total:
                if size == p.MAX_BATCH:
                    out.append(_deliver(ident, runs, now, shared))
                    runs, size = [], 0
                stop = min(total, start + p.MAX_BATCH - size)
                runs.append(item if start == 0 and stop == total else item.part(start, stop))
                size += stop - start
                start = stop
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


def _deliver(ident: bytes, runs: list[Any], now: float, shared: set[bytes]) -> Outgoing:
    """One Deliver for ``runs`` (``_Run``s and ``GroupRun``s): the compact
    form for one channel; for many, each distinct body once if the peer
    takes ``body_of`` (it is in ``shared``)."""
    if len(runs) == 1 and type(runs[0]) is GroupRun and len(runs[0]) == 1:  # one member: a run of one
        run = runs[0]
        runs = [(run.queues[0], run.endpoints[0], [run.message])]
    if len(runs) == 1 and type(runs[0]) is tuple:
        queue, _, messages = runs[0]
        header = p.Deliver(queue.name, [m.deadline - now for m in messages])
        frames: list[Any] = [p.encode(header)]
        frames.extend([m.body for m in messages])
        return Outgoing(ident, frames, runs, (), len(messages))
    channels: list[str] = []
    ttls: list[float] = []
    if ident not in shared:
        bodies = []
        for run in runs:
            if type(run) is GroupRun:
                count = len(run.queues)
                channels.extend([queue.name for queue in run.queues])
                ttls.extend([run.message.deadline - now] * count)
                bodies.extend([run.message.body] * count)
                continue
            queue, _, messages = run
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
    for run in runs:
        if type(run) is GroupRun:
            count = len(run.queues)
            body = run.message.body
            if body is not last:
                last = body
                at = seen.setdefault(id(body), len(unique))
                if at == len(unique):
                    unique.append(body)
            channels.extend([queue.name for queue in run.queues])
            ttls.extend([run.message.deadline - now] * count)
            body_of.extend([at] * count)
            continue
        queue, _, messages = run
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
