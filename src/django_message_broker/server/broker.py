"""The broker's routing core: one command in, replies and deliveries out.

How it works. ``Broker.handle`` takes the frames of one message from the
ROUTER socket (routing id, header, optional body), decodes the header, and
acts on it in one ``match``. Queues are ``ChannelQueue``s keyed by channel
name; an endpoint is a (client, channel) pair whose credit comes from the
client's receives (``Subscribe``). Every reply and delivery goes out on the
ROUTER socket without blocking (``ROUTER_MANDATORY`` makes an unroutable or
busy peer an error instead of a silent drop). Time is given as ``now``; the
shell (``server.py``) owns the socket's read loop and calls ``sweep`` about
once a second. No asyncio here.

Memory. All queues share one ``MemoryMeter``: the bytes of the messages
queued in the broker (body + ``MESSAGE_OVERHEAD`` each). A message counts
while it sits in a queue: from its send (or its Return) until it is handed
to the socket for delivery, expires, or is flushed. Delivered messages a
client has not consumed no longer count: they left this process (they
count against their channel's capacity instead). A group_send body shared
by N queues counts N times: conservative (the body is in memory once) and
exact with no reference counting. Past ``max_memory`` a send is refused
with ``QueueFull`` (its ``reason`` names the limit), a group_send skips the
members it cannot add, and a Return keeps what fits.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import zmq

from .. import protocol as p
from .._memory import default_max_memory, format_size
from ..exceptions import BrokerError, MessageTooLarge, ProtocolError, QueueFull, SubscriptionError
from ..options import DEFAULT_MAX_MESSAGE_SIZE
from ..protocol import MAX_BATCH, MAX_CREDIT, MAX_TTL, PIPELINE_SLACK
from .data_message import DataMessage
from .groups import Groups
from .outbox import Outbox
from .server_queue import ChannelQueue, Endpoint, MemoryMeter

__all__ = ["DEFAULT_MAX_BODY", "Broker"]

logger = logging.getLogger("django_message_broker.server")

DEFAULT_MAX_BODY = DEFAULT_MAX_MESSAGE_SIZE  # 16 MiB, as the clients' max_message_size
_KEEP_AS_FRAME = 65536
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)


_MAX_RULES = 64
_QUEUED, _FULL, _NO_MEMORY = 0, 1, 2
#: Flushes remembered to judge late reports (see ``Broker._flushed_since``).
_FLUSH_HISTORY = 256


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
    heartbeat: float = 1.0
    last_seen: float = 0.0
    #: channel name -> this client's endpoint in that channel's queue
    endpoints: dict[str, Endpoint] = field(default_factory=dict)


class Broker:
    def __init__(
        self,
        socket: Any,
        *,
        clock: Callable[[], float],
        max_body: int = DEFAULT_MAX_BODY,
        max_queue_length: Optional[int] = None,
        max_memory: Optional[int] = None,
        missed_heartbeats: int = 3,
        autoflush: bool = True,
    ) -> None:
        self.socket = socket
        #: Deliveries wait here until ``send_deliveries`` (after each message
        #: with ``autoflush``, else when the server has read a batch).
        self.outbox = Outbox(socket)
        self.autoflush = autoflush
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
        #: Incremented by every flush: reports (``Consumed``, ``Return``) made
        #: before a flush the client had not yet heard of are about messages
        #: the flush dropped, if that flush covered their channel's namespace.
        self.epoch = 0
        #: (epoch, prefix) of the latest flushes, oldest first.
        self._flushes: deque[tuple[int, str]] = deque(maxlen=_FLUSH_HISTORY)
        self.queues: dict[str, ChannelQueue] = {}
        self.groups = Groups()
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
        self._send_raw(ident, p.encode(reply))

    def _send_raw(self, ident: bytes, header: bytes) -> None:
        if self.outbox:  # what was decided for this peer goes first
            self._count_flush(*self.outbox.flush_peer(ident, self.clock()))
        try:
            self.socket.send(ident, _MORE_NOBLOCK)
            self.socket.send(header, _NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or its pipe full: a reply cannot wait
            logger.debug("message to %r dropped: %s", ident, exc)

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
            queue = ChannelQueue(name.encode(), self.max_queue_length)
            queue.clock = self.clock  # type: ignore[method-assign]
            queue.meter = self.memory
            self.queues[name] = queue
        return queue

    def send_deliveries(self) -> None:
        """Send what the outbox holds (one message per peer per batch)."""
        if self.outbox:
            self._count_flush(*self.outbox.flush(self.clock()))

    def _count_flush(self, sent: int, retry: set[ChannelQueue]) -> None:
        self.counters["delivered"] += sent
        for queue in retry:
            if self.queues.get(queue.name) is queue:
                self.stalled.add(queue)

    def _deliver(self, queue: ChannelQueue) -> None:
        queue.deliver()
        if queue.stalled:
            self.stalled.add(queue)

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
            queue._flush_messages()
        return 0  # pragma: no cover - the loop always returns

    def _push(self, queue: ChannelQueue, body: Any, ttl: float, limit: int, deliver: bool = True) -> int:
        """Queue ``body`` unless the channel is at ``limit`` (or the queue at
        its hard cap: ``_FULL``), or the broker at its memory limit
        (``_NO_MEMORY``: see ``_fits``). Returns ``_QUEUED`` if it went in."""
        if not self._room(queue, limit):
            self.counters["refused_full"] += 1
            return _FULL
        message = DataMessage(body)
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
        """Act on one message from the ROUTER socket: ``[ident, header, body...]``."""
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
        bodies = [f.bytes if type(f) is zmq.Frame and len(f) < _KEEP_AS_FRAME else f for f in frames[2:]]
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
        if self.autoflush:
            self.send_deliveries()

    def _dispatch(self, client: ClientState, cmd: Any, bodies: list, now: float) -> None:
        ident = client.ident
        if bodies and not isinstance(cmd, (p.Send, p.GroupSend, p.Return)):
            raise ProtocolError(f"{type(cmd).__name__} takes no body frames")
        match cmd:
            case p.Send(req, channel, ttl, capacity, checked):
                self._check_bodies(bodies)
                _check_ttl(ttl)
                queue = self._queue(channel)
                if checked:  # all or nothing, within capacity, the hard cap and memory
                    if self._room(queue, capacity, len(bodies)) < len(bodies):
                        self.counters["refused_full"] += len(bodies)
                        limit = capacity if queue.max_length is None else min(capacity, queue.max_length)
                        raise QueueFull(channel, limit)
                    messages = [DataMessage(body) for body in bodies]
                    if not self._fits(sum(m.size for m in messages)):
                        self._forget_if_empty(queue)
                        raise self._memory_full(channel, len(bodies))
                    for message in messages:
                        queue.push(message, ttl)
                    self._deliver(queue)
                    self._reply(ident, p.Reply(req, 0, "", queue.depth))
                else:
                    limit = capacity * PIPELINE_SLACK
                    refused = no_memory = 0
                    for body in bodies:
                        outcome = self._push(queue, body, ttl, limit, deliver=False)
                        refused += outcome == _FULL
                        no_memory += outcome == _NO_MEMORY
                    self._deliver(queue)
                    if no_memory:
                        raise self._memory_full(channel, no_memory)
                    if refused:
                        raise QueueFull(channel, capacity)
            case p.Subscribe(req, channel, credit):
                if not 0 < credit <= MAX_CREDIT:
                    raise ProtocolError(f"credit must be in [1, {MAX_CREDIT}], not {credit}")
                endpoint = client.endpoints.get(channel)
                queue = self._queue(channel)
                if endpoint is None:
                    endpoint = Endpoint(
                        self.outbox, [ident], channel.encode(), queue.is_process_channel, time_to_live=None
                    )
                try:
                    endpoint = queue.grant(endpoint, credit)
                except SubscriptionError as exc:
                    raise SubscriptionError(str(exc), channel) from None
                client.endpoints[channel] = endpoint
                self._deliver(queue)
            case p.Unsubscribe(req, channel):
                left = 0
                endpoint = client.endpoints.get(channel)
                subscribed = self.queues.get(channel)
                if endpoint is not None and subscribed is not None and endpoint.id in subscribed.subscribers:
                    left = endpoint.credit or 0
                    subscribed.discard(endpoint)
                    endpoint.credit = 0
                self._forget_endpoint_if_done(client, channel)
                self._reply(ident, p.Reply(req, 0, "", left))
            case p.Consumed(epoch, channels, counts):
                if len(channels) != len(counts) or any(type(c) is not int or c < 0 for c in counts):
                    raise ProtocolError("Consumed needs one count (>= 0) per channel")
                for channel, count in zip(channels, counts, strict=True):
                    if not self._flushed_since(epoch, channel):  # else: about messages a flush dropped
                        self._release(client, channel, count)
            case p.Return(channel, ttls, epoch):
                self._check_bodies(bodies, len(ttls))
                if self._flushed_since(epoch, channel):  # delivered before a flush: flushed
                    return
                self._release(client, channel, len(bodies))
                queue = self._queue(channel)
                # The hard cap (--max-queue-length) holds for returned messages
                # too: what does not fit is refused, counted and logged.
                room = None if queue.max_length is None else max(queue.max_length - len(queue.queue), 0)
                if room is not None and room < len(bodies):
                    self.counters["refused_full"] += len(bodies) - room
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
            case p.GroupSend(req, group, ttl, capacity, capacities, prefix):
                self._check_bodies(bodies, 1)
                _check_ttl(ttl)
                p.check_group_name(group)
                p.check_prefix(prefix)
                rules = _compile_rules(capacities)
                body = bodies[0]
                sent = skipped = no_memory = 0
                cut = len(prefix) + 1 if prefix else 0
                for channel in self.groups.members(group, now):
                    # Rules see the name the sender's users know (no "prefix.").
                    name = channel[cut:] if cut and p.in_namespace(channel, prefix) else channel
                    limit = next((cap for pattern, cap in rules if pattern.match(name)), capacity)
                    outcome = self._push(self._queue(channel), body, ttl, limit)
                    sent += outcome == _QUEUED
                    skipped += outcome != _QUEUED
                    no_memory += outcome == _NO_MEMORY
                if no_memory:
                    self._memory_full(group, no_memory)  # counted and logged; the members are skipped
                if skipped:
                    logger.info("group_send to %r: %d of %d channels over capacity", group, skipped, sent + skipped)
                self._reply(ident, p.Reply(req, 0, "", [sent, skipped]))
            case p.GroupAdd(req, group, channel, ttl):
                _check_ttl(ttl)
                p.check_group_name(group)
                p.check_channel_name(channel)
                self.groups.add(group, channel, ttl, now)
                self._reply(ident, p.Reply(req))
            case p.GroupDiscard(req, group, channel):
                p.check_group_name(group)
                p.check_channel_name(channel)
                self.groups.discard(group, channel)
                self._reply(ident, p.Reply(req))
            case p.Hello(req, client_id, heartbeat):
                self._drop_endpoints(client)  # a (re)connecting client replays its state
                client.client_id = client_id
                client.heartbeat = max(0.05, heartbeat)
                self._reply(ident, p.Reply(req, 0, "", [self.instance, self.max_body, self.epoch]))
            case p.Heartbeat(req):
                self._reply(ident, p.Reply(req, 0, "", self.instance))
            case p.Flush(req, prefix):
                self.flush(p.check_prefix(prefix))
                # Every client drops what it was delivered and has not read
                # (in that namespace); the flusher sees the notice before its
                # reply (one pipe).
                notice = p.encode(p.Flushed(self.epoch, prefix))
                for other in self.clients:
                    self._send_raw(other, notice)
                self._reply(ident, p.Reply(req))
            case p.Stats(req):
                self._reply(ident, p.Reply(req, 0, "", self.stats()))
            case p.Bye():
                self.drop_client(ident)
            case _:  # the decoder only yields known commands; kept for safety
                raise ProtocolError(f"unknown command {type(cmd).__name__}")

    # -- state changes ----------------------------------------------------
    def _forget_if_empty(self, queue: ChannelQueue) -> None:
        if queue.is_empty() and not queue.held:
            self.queues.pop(queue.name, None)
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
        stops counting (read, or lost with it)."""
        client = self.clients.pop(ident, None)
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
        stalled, self.stalled = self.stalled, set()
        for queue in stalled:
            if self.queues.get(queue.name) is queue:
                self._deliver(queue)
        self.send_deliveries()

    def _expire_messages(self) -> None:
        for queue in self.queues.values():
            if queue.queue:
                before = queue.expired
                queue._flush_messages()
                self.counters["expired"] += queue.expired - before

    def sweep(self, now: float) -> None:
        """Expire messages, endpoints, memberships and silent clients."""
        for ident, client in list(self.clients.items()):
            if now - client.last_seen > client.heartbeat * self.missed_heartbeats + 1.0:
                logger.info("client %s (%r) timed out", client.client_id or "?", ident)
                self.drop_client(ident)
        self._expire_messages()
        for queue in list(self.queues.values()):
            if queue.subscribers:
                queue._flush_subscribers()
            self._forget_if_empty(queue)
        self.groups.sweep(now)

    # -- introspection ----------------------------------------------------
    def queued(self) -> int:
        return sum(len(q.queue) for q in self.queues.values())

    def is_idle(self) -> bool:
        """No clients and nothing queued: safe to exit."""
        return not self.clients and not any(q.queue for q in self.queues.values())

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
            **self.counters,
        }
