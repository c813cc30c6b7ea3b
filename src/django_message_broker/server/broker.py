"""The broker's routing core: one command in, replies and deliveries out.

How it works. ``Broker.handle`` takes the frames of one message from the
ROUTER socket (routing id, header, optional body), decodes the header, and
acts on it in one ``match``. Queues are ``ChannelQueue``s keyed by channel
name; an endpoint is a (client, channel) pair whose credit comes from the
client's receives (``Subscribe``). Sans-IO, as h11 and h2 are: no socket,
no asyncio, no zmq. Every reply and delivery goes into one per-peer
outgoing buffer (``Outbox``), in the order decided; ``data_to_send()``
hands it over as ZeroMQ messages and the shell (``server.py``), which owns
the socket, sends them and reports each one that failed
(``send_failed(unsent, errno)``): a busy peer (``EAGAIN``) gets its runs
back at the head of their queues with their credit, for a retry
(``retry_stalled``); a gone peer (``EHOSTUNREACH``) gets them back and loses
its endpoints' place. A reply that fails is dropped (logged at debug): the
client's request times out, as it would had the reply been lost. Time is
given as ``now``; the shell calls ``sweep`` about once a second.

Memory. All queues share one ``MemoryMeter``: the bytes of the messages
queued in the broker (body + ``MESSAGE_OVERHEAD`` each). A message counts
while it sits in a queue: from its send (or its Return) until it is handed
to the outbox for delivery, expires, or is flushed (a delivery that the
shell fails to send comes back, and counts again). Delivered messages a
client has not consumed no longer count: they left this process (they
count against their channel's capacity instead). A group_send body shared
by N queues counts N times: conservative (the body is in memory once) and
exact with no reference counting. Past ``max_memory`` a send is refused
with ``QueueFull`` (its ``reason`` names the limit), a group_send skips the
members it cannot add, and a Return keeps what fits.
"""

from __future__ import annotations

import errno as _errno
import functools
import logging
import os
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import protocol as p
from .._memory import default_max_memory, format_size
from ..exceptions import BrokerError, MessageTooLarge, ProtocolError, QueueFull, SubscriptionError
from ..options import DEFAULT_MAX_MESSAGE_SIZE
from ..protocol import MAX_BATCH, MAX_CREDIT, MAX_TTL, PIPELINE_SLACK
from .data_message import DataMessage
from .groups import Groups
from .outbox import GroupRun, Outbox, Outgoing
from .server_queue import ChannelQueue, Endpoint, MemoryMeter
from .stats import BrokerStatistics, check_top, detailed_stats
from .tasks import Tasks

__all__ = ["BUSY", "DEFAULT_MAX_BODY", "GONE", "Broker", "Outgoing"]

logger = logging.getLogger("django_message_broker.server")

DEFAULT_MAX_BODY = DEFAULT_MAX_MESSAGE_SIZE  # 16 MiB, as the clients' max_message_size
_KEEP_AS_FRAME = 65536
#: What ``send_failed`` is told: the peer's pipe is full, or the peer is gone.
BUSY, GONE = _errno.EAGAIN, _errno.EHOSTUNREACH


_MAX_RULES = 64
_QUEUED, _FULL, _NO_MEMORY = 0, 1, 2
#: Flushes remembered to judge late reports (see ``Broker._flushed_since``).
_FLUSH_HISTORY = 256
_PING = p.encode(p.Ping())


@functools.lru_cache(maxsize=256)
def _compile_pattern(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _check_ttl(ttl: float) -> float:
    if not 0 < ttl <= MAX_TTL:  # also refuses NaN
        raise ProtocolError(f"ttl must be a number of seconds in (0, {MAX_TTL:g}], not {ttl!r}")
    return ttl


def _compile_rules(rules: list[tuple[str, int]]) -> list[tuple[re.Pattern, int]]:
    """A sender's ``channel_capacity`` rules, compiled once and cached."""
    if len(rules) > _MAX_RULES:
        raise ProtocolError(f"{len(rules)} capacity rules; at most {_MAX_RULES}")
    try:
        return [(_compile_pattern(pattern), cap) for pattern, cap in rules]
    except re.error as exc:
        raise ProtocolError(f"bad capacity pattern: {exc}") from None


@dataclass(eq=False)
class ClientState:
    ident: bytes
    client_id: str = ""
    #: Seconds between the client's heartbeats; 0: it sends none, and only
    #: its connection closing (or ZeroMQ's own heartbeats failing) ends it.
    heartbeat: float = 1.0
    last_seen: float = 0.0
    #: The socket (file descriptor) its connection came in on, once known
    #: (clients with task state: see ``connection_closed``).
    fd: int = -1
    #: channel name -> this client's endpoint in that channel's queue
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    #: The client's process, from its Hello (for stats); ``connected_at``
    #: is the broker's clock when it said Hello.
    host: str = ""
    pid: int = 0
    name: str = ""
    connected_at: float = 0.0


class Broker:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        max_body: int = DEFAULT_MAX_BODY,
        max_queue_length: Optional[int] = None,
        max_memory: Optional[int] = None,
        missed_heartbeats: int = 3,
        durable: bool = False,
        wall_clock: Callable[[], float] = lambda: 0.0,
        load_body: Callable[[int], Optional[bytes]] = lambda sid: None,
        version: str = "",
        rss: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        #: Replies and deliveries wait here until ``data_to_send``.
        self.outbox = Outbox()
        self.clock = clock
        self.max_body = max_body
        self.max_queue_length = max_queue_length
        #: Bytes of queued messages, broker-wide; ``max_memory`` defaults to a
        #: quarter of the host's physical memory.
        self.memory = MemoryMeter(default_max_memory() if max_memory is None else max_memory)
        self._memory_refusals = 0
        self._next_memory_log = 0.0
        self._next_memory_expiry = 0.0
        self.missed_heartbeats = missed_heartbeats
        self.instance = os.urandom(8).hex()
        #: For ``Stats(top=N)`` (server/stats.py). One attribute, not six: past
        #: 30 instance attributes CPython (3.11+) stops sharing the instance
        #: dict's keys, and every attribute access in handle() got slower
        #: (measured: 2-5% on benchmarks/core.py).
        self.statistics = BrokerStatistics(version, rss, clock())
        #: Incremented by every flush: reports (``Consumed``, ``Return``) made
        #: before a flush the client had not yet heard of are about messages
        #: the flush dropped, if that flush covered their channel's namespace.
        self.epoch = 0
        #: (epoch, prefix) of the latest flushes, oldest first.
        self._flushes: deque[tuple[int, str]] = deque(maxlen=_FLUSH_HISTORY)
        self.queues: dict[str, ChannelQueue] = {}
        self.groups = Groups()
        #: Celery's side: task queues, exchanges and their consumers.
        self.tasks = Tasks(
            clock=clock, sink=self.outbox.task, meter=self.memory, durable=durable, wall_clock=wall_clock
        )
        #: Batches of durable changes handed to the store (``take_journal``),
        #: and the confirms that wait for theirs to commit: (seq, ident, req).
        self.store_seq = 0
        self.committed_seq = 0
        #: seq -> the messages its batch put, to ``cool`` once committed.
        self._puts: dict[int, list] = {}
        self.awaiting_store: deque[tuple[int, bytes, int, Any]] = deque()
        #: Clients whose socket the shell should tell us (``record_fd``).
        self.fd_wanted: list[bytes] = []
        #: Clients to ask whether they are still there (``Ping``), and when.
        self.probes: dict[bytes, list[float]] = {}
        #: Task deliveries came back from a busy peer: retry on the next tick.
        self.tasks_stalled = False
        self.clients: dict[bytes, ClientState] = {}
        self.stalled: set[ChannelQueue] = set()
        self._bad_inputs = 0
        self._next_bad_input_log = 0.0
        self.counters = {
            "received": 0,
            "delivered": 0,
            "refused_full": 0,
            "refused_memory": 0,
            "errors": 0,
            "expired": 0,
        }

    # -- helpers ------------------------------------------------------------
    def _reply(self, ident: bytes, reply: Any) -> None:
        self.outbox.reply(ident, p.encode(reply))

    # -- the shell's side: what to send, and what failed ---------------------
    def data_to_send(self, *, replies_only: bool = False) -> list[list[Outgoing]]:
        """Everything decided since the last call, as ZeroMQ messages: one
        list per peer, each in order (send ``[out.ident, *out.frames]``).
        Does no I/O (h2's name). Delivered messages count as delivered from
        here; what the caller cannot send goes back through ``send_failed``.

        ``replies_only``: only the peers that were sent a reply (with what
        was decided for them before it). The shell takes those after each
        message it handles and the rest once per read batch: a reply
        unblocks a caller at once, and deliveries to a peer still coalesce
        into one Deliver per batch. (Holding replies to the end of the batch
        slowed a group_send producer, so its consumers got smaller batches
        and asked for credit three times as often.)"""
        if not self.outbox:
            return []
        peers = self.outbox.take(self.clock(), replies_only=replies_only)
        delivered = 0
        for messages in peers:
            for out in messages:
                delivered += out.count
        self.counters["delivered"] += delivered
        return peers

    def send_failed(self, unsent: Iterable[Outgoing], errno: int) -> None:
        """The shell could not send ``unsent`` (h11's name): the message that
        failed with ``errno`` and those after it to the same peer, which the
        shell must not send out of order. ``BUSY`` (EAGAIN): the peer's pipe
        is full; its runs go back to the head of their queues with their
        credit, and the queues are retried (``retry_stalled``). ``GONE``
        (EHOSTUNREACH): the peer left; its runs go back and its endpoints
        are dropped. A reply is dropped: the client's request times out."""
        gone = errno == GONE
        unsent = list(unsent)
        if gone and unsent:
            # The peer is gone (a Ping or a delivery found no one). What it
            # held of task queues goes back now; a client without heartbeats
            # of its own (the kombu transport) would never be swept, so all of
            # it goes.
            ident = unsent[0].ident
            client = self.clients.get(ident)
            if client is not None and not client.heartbeat:
                self.drop_client(ident)
            elif ident in self.tasks.clients:
                self.tasks.drop_client(ident)
        # Task deliveries go back in one call: they return in the order they
        # were made, and are dispatched again only once all are back.
        deliveries = [d for out in unsent for d in out.tasks]
        if deliveries:
            self.counters["delivered"] -= len(deliveries)
            self.tasks.undeliver(deliveries)
            self.tasks_stalled = True
        for out in reversed(unsent):  # the last first: each run goes back to the head
            if out.tasks:
                continue
            if not out.runs:
                logger.debug("message to %r dropped: errno %d", out.ident, errno)
                continue
            self.counters["delivered"] -= out.count
            for run in reversed(out.runs):
                if isinstance(run, GroupRun):
                    requeued = run.requeue(gone=gone)
                else:
                    queue, endpoint, messages = run
                    queue.requeue(endpoint, messages, gone=gone)
                    requeued = [queue]
                for queue in requeued:
                    if self.queues.get(queue.name) is queue:
                        self.stalled.add(queue)

    def _warn_bad_input(self, ident: bytes, exc: BrokerError, now: float) -> None:
        """One log line per second at most: bad input must not cost more
        than it takes to refuse it."""
        self._bad_inputs += 1
        if now >= self._next_bad_input_log:
            self._next_bad_input_log = now + 1.0
            more = f" ({self._bad_inputs - 1} more since the last report)" if self._bad_inputs > 1 else ""
            logger.warning("bad message from %r: %s%s", ident, exc, more)
            self._bad_inputs = 0

    def _memory_full(self, channel: str, refused: int) -> QueueFull:
        """Count ``refused`` messages turned away at the memory limit, log it
        (once per second at most), and return the error for the sender."""
        reason = f"broker memory limit {format_size(self.memory.limit or 0)} reached"
        self.counters["refused_memory"] += refused
        self._memory_refusals += refused
        now = self.clock()
        if now >= self._next_memory_log:
            self._next_memory_log = now + 1.0
            logger.warning(
                "%s: %d message(s) refused since the last report (%d bytes queued)",
                reason,
                self._memory_refusals,
                self.memory.used,
            )
            self._memory_refusals = 0
        return QueueFull(channel, 0, reason)

    def _error(self, ident: bytes, req: int, exc: BrokerError) -> None:
        self.counters["errors"] += 1
        self._reply(ident, p.error_reply(req, exc))

    def _queue(self, name: str) -> ChannelQueue:
        queue = self.queues.get(name)
        if queue is None:
            p.check_channel_name(name)
            queue = ChannelQueue(name.encode(), self.max_queue_length, clock=self.clock, meter=self.memory)
            self.queues[name] = queue
        return queue

    def _deliver(self, queue: ChannelQueue) -> None:
        queue.deliver(sink=self.outbox)

    @staticmethod
    def _room(queue: ChannelQueue, capacity: int, wanted: int = 1) -> int:
        """How many more messages ``queue`` takes (at least ``wanted`` if it
        can). The one capacity rule: ``capacity`` counts what is queued and
        what receivers hold unread (``queue.depth``); the hard cap
        (``max_queue_length``) counts what is queued, since it bounds the
        broker's memory. Expired messages are dropped first if that helps."""
        for attempt in range(2):
            room = capacity - queue.depth
            if queue.max_length is not None:
                room = min(room, queue.max_length - len(queue.queue))
            if room >= wanted or attempt or not queue.queue:
                return max(room, 0)
            queue.expire()
        return 0  # pragma: no cover - the loop always returns

    def _push(self, queue: ChannelQueue, message: DataMessage, ttl: float, limit: int, deliver: bool = True) -> int:
        """Queue ``message`` unless the channel is at ``limit`` (or the queue
        at its hard cap: ``_FULL``), or the broker at its memory limit
        (``_NO_MEMORY``: see ``_fits``). Returns ``_QUEUED`` if it went in."""
        if not self._room(queue, limit):
            self.counters["refused_full"] += 1
            queue.refused_full += 1
            return _FULL
        if not self._fits(message.size):
            return _NO_MEMORY
        queue.push(message, ttl)
        if deliver:
            self._deliver(queue)
        return _QUEUED

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit under the memory limit. If not,
        expired messages are dropped everywhere first: at most every 0.1 s,
        since the scan is a pass over every queue and a flood of refused
        sends must stay cheap."""
        if self.memory.fits(size):
            return True
        now = self.clock()
        if now >= self._next_memory_expiry:
            self._next_memory_expiry = now + 0.1
            self._expire_messages()
        return self.memory.fits(size)

    def _check_bodies(self, bodies: list, count: Optional[int] = None) -> None:
        if not bodies or (count is not None and len(bodies) != count):
            expected = "one or more" if count is None else str(count)
            raise ProtocolError(f"this command needs {expected} body frame(s), not {len(bodies)}")
        for body in bodies:
            size = len(body)
            if size > self.max_body:
                raise MessageTooLarge(size, self.max_body)

    # -- the one entry point ---------------------------------------------------
    def handle(self, frames: list, now: float) -> None:
        """Act on one message from the ROUTER socket: ``[ident, header, body...]``.
        What it decides to send waits for ``data_to_send``."""
        self.counters["received"] += 1
        if len(frames) < 2:
            if frames:
                self._error(bytes(frames[0]), 0, ProtocolError("empty message"))
            return
        ident = bytes(frames[0])
        if len(frames) - 2 > MAX_BATCH:
            self._error(ident, 0, ProtocolError(f"{len(frames) - 2} body frames; at most {MAX_BATCH}"))
            return
        # Small bodies are kept as bytes: a zmq.Frame costs ~200 bytes more and
        # pins libzmq's receive buffer. Large ones stay frames (never copied).
        bodies = [f if type(f) is bytes or len(f) >= _KEEP_AS_FRAME else bytes(f) for f in frames[2:]]
        try:
            cmd = p.decode_command(frames[1])
        except ProtocolError as exc:
            self._warn_bad_input(ident, exc, now)
            self._error(ident, 0, exc)
            return
        client = self.clients.get(ident)
        if client is None:
            client = self.clients[ident] = ClientState(ident, last_seen=now)
            if not isinstance(cmd, p.Hello):
                self._reply(ident, p.Welcome(self.instance, self.max_body))
        client.last_seen = now
        req = getattr(cmd, "req", 0)
        try:
            self._dispatch(client, cmd, bodies, now)
        except BrokerError as exc:
            self._error(ident, req, exc)
        except Exception as exc:  # a bug must not take the broker down
            logger.exception("error handling %r from %r", type(cmd).__name__, ident)
            self._error(ident, req, BrokerError(f"internal error: {exc}"))

    def _dispatch(self, client: ClientState, cmd: Any, bodies: list, now: float) -> None:
        if bodies and not isinstance(cmd, (p.Send, p.GroupSend, p.Return, p.Publish)):
            raise ProtocolError(f"{type(cmd).__name__} takes no body frames")
        if isinstance(cmd, p.TaskCommand):
            self._on_task(client, cmd, bodies)
            return
        match cmd:
            case p.Send():
                self._on_send(client, cmd, bodies)
            case p.Subscribe():
                self._on_subscribe(client, cmd)
            case p.Unsubscribe():
                self._on_unsubscribe(client, cmd)
            case p.Consumed():
                self._on_consumed(client, cmd)
            case p.Return():
                self._on_return(client, cmd, bodies, now)
            case p.GroupSend():
                self._on_group_send(client, cmd, bodies, now)
            case p.GroupAdd():
                self._on_group_add(client, cmd, now)
            case p.GroupDiscard():
                self._on_group_discard(client, cmd)
            case p.Hello():
                self._on_hello(client, cmd)
            case p.Heartbeat(req):
                self._reply(client.ident, p.Reply(req, 0, "", self.instance))
            case p.Flush():
                self._on_flush(client, cmd)
            case p.Stats(req, top):
                value = self.stats() if not top else self.detailed_stats(check_top(top), now)
                self._reply(client.ident, p.Reply(req, 0, "", value))
            case p.Bye():
                self.drop_client(client.ident)
            case _:  # the decoder only yields known commands; kept for safety
                raise ProtocolError(f"unknown command {type(cmd).__name__}")

    # -- one method per command ----------------------------------------------
    def _on_send(self, client: ClientState, cmd: p.Send, bodies: list) -> None:
        self._check_bodies(bodies)
        # sum(map()) runs at C speed for a batch; one body skips its call overhead
        self.statistics.bytes_in += len(bodies[0]) if len(bodies) == 1 else sum(map(len, bodies))
        _check_ttl(cmd.ttl)
        channel, capacity = cmd.channel, cmd.capacity
        queue = self._queue(channel)
        if not cmd.checked:  # pipelined: silent unless refused
            limit = capacity * PIPELINE_SLACK
            refused = no_memory = 0
            for body in bodies:
                outcome = self._push(queue, DataMessage(body), cmd.ttl, limit, deliver=False)
                refused += outcome == _FULL
                no_memory += outcome == _NO_MEMORY
            queue.enqueued += len(bodies) - refused - no_memory
            self._deliver(queue)
            if no_memory:
                raise self._memory_full(channel, no_memory)
            if refused:
                raise QueueFull(channel, capacity)
            return
        # Checked: all or nothing, within capacity, the hard cap and memory.
        if self._room(queue, capacity, len(bodies)) < len(bodies):
            self.counters["refused_full"] += len(bodies)
            queue.refused_full += len(bodies)
            limit = capacity if queue.max_length is None else min(capacity, queue.max_length)
            raise QueueFull(channel, limit)
        messages = [DataMessage(body) for body in bodies]
        if not self._fits(sum(m.size for m in messages)):
            self._forget_if_empty(queue)
            raise self._memory_full(channel, len(bodies))
        for message in messages:
            queue.push(message, cmd.ttl)
        queue.enqueued += len(messages)
        self._deliver(queue)
        self._reply(client.ident, p.Reply(cmd.req, 0, "", queue.depth))

    def _on_subscribe(self, client: ClientState, cmd: p.Subscribe) -> None:
        channel, credit = cmd.channel, cmd.credit
        if not 0 < credit <= MAX_CREDIT:
            raise ProtocolError(f"credit must be in [1, {MAX_CREDIT}], not {credit}")
        endpoint = client.endpoints.get(channel)
        queue = self._queue(channel)
        if endpoint is None:
            # No socket: the broker's endpoints are delivered through the outbox.
            endpoint = Endpoint(None, [client.ident], channel.encode(), queue.is_process_channel, time_to_live=None)
        try:
            endpoint = queue.grant(endpoint, credit)
        except SubscriptionError as exc:
            raise SubscriptionError(str(exc), channel) from None
        client.endpoints[channel] = endpoint
        self._deliver(queue)

    def _on_unsubscribe(self, client: ClientState, cmd: p.Unsubscribe) -> None:
        channel = cmd.channel
        left = 0
        endpoint = client.endpoints.get(channel)
        subscribed = self.queues.get(channel)
        if endpoint is not None and subscribed is not None and endpoint.id in subscribed.subscribers:
            left = endpoint.credit or 0
            subscribed.discard(endpoint)
            endpoint.credit = 0
        self._forget_endpoint_if_done(client, channel)
        self._reply(client.ident, p.Reply(cmd.req, 0, "", left))

    def _on_consumed(self, client: ClientState, cmd: p.Consumed) -> None:
        channels, counts = cmd.channels, cmd.counts
        if len(channels) != len(counts) or any(type(c) is not int or c < 0 for c in counts):
            raise ProtocolError("Consumed needs one count (>= 0) per channel")
        for channel, count in zip(channels, counts, strict=True):
            if not self._flushed_since(cmd.epoch, channel):  # else: about messages a flush dropped
                self._release(client, channel, count)

    def _on_return(self, client: ClientState, cmd: p.Return, bodies: list, now: float) -> None:
        channel, ttls = cmd.channel, cmd.ttls
        self._check_bodies(bodies, len(ttls))
        if self._flushed_since(cmd.epoch, channel):  # delivered before a flush: flushed
            return
        self._release(client, channel, len(bodies))
        queue = self._queue(channel)
        # The hard cap (--max-queue-length) holds for returned messages
        # too: what does not fit is refused, counted and logged.
        room = None if queue.max_length is None else max(queue.max_length - len(queue.queue), 0)
        if room is not None and room < len(bodies):
            self.counters["refused_full"] += len(bodies) - room
            queue.refused_full += len(bodies) - room
            logger.warning("%d returned message(s) refused: %r is at its hard cap", len(bodies) - room, channel)
            bodies, ttls = bodies[:room], ttls[:room]  # the oldest stay first
        # So does the memory limit: the oldest that fit are kept.
        returned = [
            DataMessage(body, now + ttl)
            for body, ttl in zip(bodies, ttls, strict=True)
            if 0 < ttl <= MAX_TTL  # expired (or nonsense) ttls are dropped
        ]
        fit, size = 0, 0
        while fit < len(returned) and self._fits(size + returned[fit].size):
            size += returned[fit].size
            fit += 1
        if fit < len(returned):
            self._memory_full(channel, len(returned) - fit)
        for message in reversed(returned[:fit]):  # newest first to the front
            queue.push_front(message)
        self._deliver(queue)

    def _on_group_send(self, client: ClientState, cmd: p.GroupSend, bodies: list, now: float) -> None:
        """Each member gets the message, within its own capacity. A member
        whose queue is empty and whose endpoint has credit (the usual case:
        a receive waits) gets it at once, as ``deliver`` would, but without
        a queue entry or a run of its own: all such members of a peer share
        one message object and one ``GroupRun`` in the outbox. The others
        (a backlog, no credit, no receiver, at capacity or at the memory
        limit) take the general path, ``_push``."""
        self._check_bodies(bodies, 1)
        self.statistics.bytes_in += len(bodies[0])
        _check_ttl(cmd.ttl)
        group = p.check_group_name(cmd.group)
        prefix = p.check_prefix(cmd.prefix)
        rules = _compile_rules(cmd.capacities)
        body, ttl, capacity = bodies[0], cmd.ttl, cmd.capacity
        sent = skipped = no_memory = 0
        cut = len(prefix) + 1 if prefix else 0
        message = DataMessage(body, self.clock() + ttl)  # the members delivered at once share it
        size = message.size
        memory, queues, member = self.memory, self.queues, self.outbox.member
        limit = capacity
        for channel in self.groups.members(group, now):
            if rules:
                # Rules see the name the sender's users know (no "prefix.").
                name = channel[cut:] if cut and p.in_namespace(channel, prefix) else channel
                limit = next((cap for pattern, cap in rules if pattern.match(name)), capacity)
            queue = queues.get(channel)
            if (
                queue is not None
                and not queue.queue
                and queue.held < limit
                and queue.max_length != 0
                and (memory.limit is None or memory.used + size <= memory.limit)
            ):
                endpoint = queue.hand_over()  # what _push and deliver would do, in one step
                if endpoint is not None:
                    queue.enqueued += 1
                    member(queue, endpoint, message)
                    sent += 1
                    continue
            if queue is None:
                queue = self._queue(channel)
            # The members' queues share the message too. A backlog means no
            # endpoint of this queue can take more now (a queue is only left
            # holding messages when none can): the message waits behind it,
            # without a delivery attempt, until credit comes.
            outcome = self._push(queue, message, ttl, limit, deliver=not queue.queue)
            queued = outcome == _QUEUED
            queue.enqueued += queued
            sent += queued
            skipped += outcome != _QUEUED
            no_memory += outcome == _NO_MEMORY
        if no_memory:
            self._memory_full(group, no_memory)  # counted and logged; the members are skipped
        if skipped:
            logger.info("group_send to %r: %d of %d channels over capacity", group, skipped, sent + skipped)
        self._reply(client.ident, p.Reply(cmd.req, 0, "", [sent, skipped]))

    def _on_group_add(self, client: ClientState, cmd: p.GroupAdd, now: float) -> None:
        _check_ttl(cmd.ttl)
        p.check_group_name(cmd.group)
        p.check_channel_name(cmd.channel)
        self.groups.add(cmd.group, cmd.channel, cmd.ttl, now)
        self._reply(client.ident, p.Reply(cmd.req))

    def _on_group_discard(self, client: ClientState, cmd: p.GroupDiscard) -> None:
        p.check_group_name(cmd.group)
        p.check_channel_name(cmd.channel)
        self.groups.discard(cmd.group, cmd.channel)
        self._reply(client.ident, p.Reply(cmd.req))

    def _on_hello(self, client: ClientState, cmd: p.Hello) -> None:
        self._drop_endpoints(client)  # a (re)connecting client replays its state
        client.client_id = cmd.client_id
        # 0: no heartbeats (the task transport): liveness is the connection's,
        # watched through its socket (``connection_closed``).
        client.heartbeat = 0.0 if cmd.heartbeat == 0 else max(0.05, cmd.heartbeat)
        client.host, client.pid, client.name = cmd.host[:255], cmd.pid, cmd.name[:255]
        client.connected_at = self.clock()
        if not client.heartbeat:
            self.fd_wanted.append(client.ident)
        if cmd.shared_bodies:  # it reads Deliver.body_of: a group_send's body goes once
            self.outbox.shared.add(client.ident)
        else:
            self.outbox.shared.discard(client.ident)
        self._reply(client.ident, p.Reply(cmd.req, 0, "", [self.instance, self.max_body, self.epoch]))

    def _on_flush(self, client: ClientState, cmd: p.Flush) -> None:
        prefix = p.check_prefix(cmd.prefix)
        self.flush(prefix)
        # Every client drops what it was delivered and has not read (in that
        # namespace); the notice follows what each was sent before it, and
        # the flusher sees it before its reply (one ordered buffer per peer).
        notice = p.encode(p.Flushed(self.epoch, prefix))
        for other in self.clients:
            self.outbox.reply(other, notice)
        self._reply(client.ident, p.Reply(cmd.req))

    def _on_task(self, client: ClientState, cmd: p.TaskCommand, bodies: list) -> None:
        """Task queues (Celery's side): the model is ``self.tasks``."""
        tasks, ident = self.tasks, client.ident
        value: Any = None
        match cmd:
            case p.Publish():
                self._check_bodies(bodies, 1)
                value = tasks.publish(
                    ident, cmd.exchange, cmd.routing_key, bodies[0], cmd.priority, cmd.ttl, cmd.persistent
                )
                if not cmd.confirm:
                    return
                if tasks.stored:  # confirmed once on disk: when the store commits the next batch
                    self.awaiting_store.append((self.store_seq + 1, ident, cmd.req, value))
                    return
            case p.Ack(session, tags, multiple):
                tasks.ack(ident, session, tags, multiple=multiple)
                return
            case p.Reject(session, tags, requeue, multiple):
                tasks.reject(ident, session, tags, requeue=requeue, multiple=multiple)
                return
            case p.Consume(_, session, queue, tag, no_ack):
                tasks.consume(ident, session, queue, tag, no_ack=no_ack)
            case p.Cancel(_, session, tag):
                tasks.cancel(ident, session, tag)
            case p.Qos(_, session, prefetch):
                tasks.qos(ident, session, prefetch)
            case p.Get(req, session, queue, no_ack):
                delivery = tasks.get(ident, session, queue, no_ack=no_ack)
                if delivery is not None:
                    header = p.encode(p.Reply(req, 0, "", [delivery.tag, delivery.message.redelivered]))
                    self.outbox.reply_frames(ident, [header, delivery.body], [delivery])
                    return
            case p.QueueDeclare():
                value = list(
                    tasks.declare_queue(
                        ident,
                        cmd.queue,
                        passive=cmd.passive,
                        durable=cmd.durable,
                        exclusive=cmd.exclusive,
                        auto_delete=cmd.auto_delete,
                        arguments=cmd.arguments,
                    )
                )
            case p.QueueBind(_, queue, exchange, routing_key):
                tasks.bind(ident, queue, exchange, routing_key)
            case p.QueueUnbind(_, queue, exchange, routing_key):
                tasks.unbind(ident, queue, exchange, routing_key)
            case p.QueuePurge(_, queue):
                value = tasks.purge(ident, queue)
            case p.QueueDelete(_, queue, if_unused, if_empty):
                value = tasks.delete_queue(ident, queue, if_unused=if_unused, if_empty=if_empty)
            case p.ExchangeDeclare():
                tasks.declare_exchange(
                    ident, cmd.exchange, cmd.type, passive=cmd.passive, durable=cmd.durable, auto_delete=cmd.auto_delete
                )
            case p.ExchangeDelete(_, exchange, if_unused):
                tasks.delete_exchange(ident, exchange, if_unused=if_unused)
            case p.Recover(_, session):
                tasks.recover(ident, session)
            case p.CloseSession(_, session):
                tasks.close_session(ident, session)
            case p.Open(_, vhost):
                tasks.open(ident, vhost)
            case p.Sync(req):
                target = self.store_seq + (1 if tasks.journal else 0)
                if target > self.committed_seq:
                    self.awaiting_store.append((target, ident, req, None))
                    return
            case _:  # pragma: no cover - every TaskCommand is matched above
                raise ProtocolError(f"unknown command {type(cmd).__name__}")
        self._reply(ident, p.Reply(cmd.req, 0, "", value))  # type: ignore[attr-defined]

    # -- the durable store (the shell runs it) ------------------------------------
    def take_journal(self) -> Optional[tuple[int, list[tuple]]]:
        """The durable changes decided since the last call, numbered, for
        ``Store.submit``; None if there are none."""
        if not self.tasks.journal:
            return None
        self.store_seq += 1
        ops, puts = self.tasks.take_journal()
        if puts:
            self._puts[self.store_seq] = puts
        return self.store_seq, ops

    def committed(self, seq: int, error: Optional[str] = None) -> None:
        """The store committed (or, with ``error``, failed) every batch up to
        ``seq``: answer the confirms that waited for them."""
        self.committed_seq = max(self.committed_seq, seq)
        for done in [n for n in self._puts if n <= seq]:
            puts = self._puts.pop(done)
            if error is None:  # on disk: deep in a long queue, they need not stay in memory
                self.tasks.cool(puts)
        waiting = self.awaiting_store
        while waiting and waiting[0][0] <= seq:
            _, ident, req, value = waiting.popleft()
            if ident not in self.clients:
                continue
            if error is None:
                self._reply(ident, p.Reply(req, 0, "", value))
            else:
                self._error(ident, req, QueueFull("", 0, error))

    # -- connections that close (the shell watches the socket) -----------------
    def record_fd(self, ident: bytes, fd: int) -> None:
        """The socket ``ident``'s messages come in on (the shell reads it
        off the message after an ``Open``)."""
        client = self.clients.get(ident)
        if client is not None:
            client.fd = fd

    def connection_closed(self, fd: int, now: float) -> None:
        """A connection on socket ``fd`` closed. Whoever came in on it (the
        clients without heartbeats of their own: the kombu transport's) is
        asked at once whether it is still there (a ``Ping``): if the peer is
        gone, the send fails and ``send_failed`` gives back what it held and
        forgets it. File descriptors are reused, so a live peer may share the
        number: it just gets the Ping. Asked again a few times in the next
        second, in case the socket had not yet noticed."""
        for ident, client in self.clients.items():
            if client.fd == fd:
                self.probes[ident] = [now + 0.05, now + 0.2, now + 1.0]
                self.outbox.reply(ident, _PING)

    def probe(self, now: float) -> None:
        """Ask again the clients ``connection_closed`` suspects (every tick)."""
        for ident, times in list(self.probes.items()):
            if ident not in self.clients:
                del self.probes[ident]
                continue
            if times and now >= times[0]:
                times.pop(0)
                self.outbox.reply(ident, _PING)
            if not times:
                del self.probes[ident]

    # -- state changes ----------------------------------------------------
    def _forget_if_empty(self, queue: ChannelQueue) -> None:
        if queue.is_empty() and not queue.held:
            if self.queues.pop(queue.name, None) is queue:  # its count goes to the total
                self.statistics.retired_enqueued += queue.enqueued
            self.stalled.discard(queue)

    def _release(self, client: ClientState, channel: str, count: int) -> None:
        """``count`` messages of ``channel`` held by ``client`` were consumed
        or handed back: they stop counting against the channel's capacity."""
        endpoint = client.endpoints.get(channel)
        queue = self.queues.get(channel)
        if endpoint is None or queue is None:
            return
        queue.release(endpoint, count)
        self._forget_endpoint_if_done(client, channel)

    def _forget_endpoint_if_done(self, client: ClientState, channel: str) -> None:
        """An endpoint stays with its client while subscribed or while it
        holds messages (they count against capacity until reported)."""
        endpoint = client.endpoints.get(channel)
        if endpoint is None or endpoint.held:
            return
        queue = self.queues.get(channel)
        if queue is None or endpoint.id not in queue.subscribers:
            del client.endpoints[channel]
            if queue is not None:
                self._forget_if_empty(queue)

    def _drop_endpoints(self, client: ClientState) -> None:
        """End the client's subscriptions (a reconnecting client grants its
        credit again). What it holds stays counted: its buffer survives."""
        for channel, endpoint in list(client.endpoints.items()):
            queue = self.queues.get(channel)
            if queue is not None and endpoint.id in queue.subscribers:
                queue.discard(endpoint)
            endpoint.credit = 0
            self._forget_endpoint_if_done(client, channel)

    def drop_client(self, ident: bytes) -> None:
        """The client left or died: its subscriptions end, and what it held
        stops counting (read, or lost with it). Its unacknowledged task
        messages go back to their queues."""
        self.tasks.drop_client(ident)
        self.probes.pop(ident, None)
        client = self.clients.pop(ident, None)
        self.outbox.shared.discard(ident)
        if client is None:
            return
        for channel, endpoint in client.endpoints.items():
            queue = self.queues.get(channel)
            if queue is not None:
                queue.release(endpoint, endpoint.held)
        self._drop_endpoints(client)

    def flush(self, prefix: str = "") -> None:
        """Drop every queued message and every group of namespace ``prefix``
        (``""``: all; endpoints stay), and what clients hold there: the
        ``Flushed`` notice tells them to drop it. Other namespaces are not
        touched: their held counts stay, and their late reports count."""
        self.epoch += 1
        self._flushes.append((self.epoch, prefix))
        for client in self.clients.values():
            for channel, endpoint in client.endpoints.items():
                if p.in_namespace(channel, prefix):
                    endpoint.held = 0
        for queue in list(self.queues.values()):
            if p.in_namespace(queue.name, prefix):
                queue.clear()
                queue.held = 0
                self._forget_if_empty(queue)
        for client in self.clients.values():
            for channel in list(client.endpoints):
                if p.in_namespace(channel, prefix):
                    self._forget_endpoint_if_done(client, channel)
        self.groups.clear(prefix)

    def _flushed_since(self, epoch: int, channel: str) -> bool:
        """Did a flush after ``epoch`` cover ``channel``? A report (``Consumed``,
        ``Return``) made at ``epoch`` is then about messages it dropped. Flushes
        too old to remember count as covering (the old, safe answer)."""
        if epoch >= self.epoch:
            return False
        if epoch < self.epoch - len(self._flushes):
            return True
        return any(e > epoch and p.in_namespace(channel, prefix) for e, prefix in self._flushes)

    def retry_stalled(self) -> None:
        """Deliver again from the queues whose peer was busy or gone (the
        output waits for ``data_to_send``)."""
        if self.tasks_stalled:
            self.tasks_stalled = False
            self.tasks.retry()
        stalled, self.stalled = self.stalled, set()
        for queue in stalled:
            if self.queues.get(queue.name) is queue:
                self._deliver(queue)

    def _expire_messages(self) -> None:
        now = self.clock()
        for queue in self.queues.values():
            if queue.queue:
                self.counters["expired"] += queue.expire(now)

    def sweep(self, now: float) -> None:
        """Expire messages, endpoints, memberships and silent clients."""
        for ident, client in list(self.clients.items()):
            if client.heartbeat and now - client.last_seen > client.heartbeat * self.missed_heartbeats + 1.0:
                logger.info("client %s (%r) timed out", client.client_id or "?", ident)
                self.drop_client(ident)
        self._expire_messages()
        for queue in list(self.queues.values()):
            if queue.subscribers:
                queue.expire_endpoints(now)
            self._forget_if_empty(queue)
        self.groups.sweep(now)
        self.tasks.sweep(now)
        statistics = self.statistics
        statistics.history.sample(now, self.enqueued_total(), self.counters["delivered"], statistics.bytes_in)

    # -- introspection ----------------------------------------------------
    def queued(self) -> int:
        return sum(len(q.queue) for q in self.queues.values())

    def is_idle(self) -> bool:
        """No clients and nothing queued: safe to exit."""
        return (
            not self.clients
            and not any(q.queue for q in self.queues.values())
            and not any(q.ready for v in self.tasks.vhosts.values() for q in v.queues.values())
        )

    def enqueued_total(self) -> int:
        """Messages enqueued since the broker started (by queues it forgot
        too). A sum over the queues: for ``sweep`` and stats, not per message."""
        return self.statistics.retired_enqueued + sum(queue.enqueued for queue in self.queues.values())

    def detailed_stats(self, top: int, now: Optional[float] = None) -> dict[str, Any]:
        """``Stats(top)``: totals, rates, the ``top`` deepest channels and
        the clients holding most (server/stats.py)."""
        return detailed_stats(self, top, self.clock() if now is None else now)

    def stats(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "clients": len(self.clients),
            "queues": len(self.queues),
            "queued": self.queued(),
            "memory": self.memory.used,
            "max_memory": self.memory.limit,
            "held": sum(q.held for q in self.queues.values()),
            "groups": len(self.groups),
            "memberships": self.groups.memberships(),
            **self.tasks.stats(),
            **self.counters,
        }
