"""Task queues: the AMQP model that kombu (and so Celery) expects. Pure.

How it works. Beside Channels' channels, the broker keeps named task queues,
exchanges that route to them, and the consumers of each connection, per
virtual host. A publish goes to an exchange; the exchange's bindings decide
the queues (direct: equal routing key; topic: AMQP's ``*`` and ``#``
patterns; fanout: every bound queue; the default exchange ``""``: the queue
named by the routing key). A queue keeps its ready messages in ten FIFO
levels, one per priority, and serves the highest first (9 before 0, as
AMQP and RabbitMQ do).

A connection's consumers live in *sessions* (kombu's channels), each with a
prefetch limit. Delivering a message moves it, in one step, from its
queue's ready levels to the session's unacknowledged table under a delivery
tag: there is no moment when it is in neither. ``ack`` forgets it;
``reject(requeue=True)``, ``recover``, closing the session, and the death of
the connection put it back at the head of its queue (marked redelivered).
Nothing is ever redelivered because of its age: a live consumer holds a
message for as long as it likes (an ETA task held for a day is delivered
once). The broker shell learns of a dead connection from its socket (see
``server.py``) and calls ``drop_client``.

Deliveries leave through ``sink(ident, delivery)`` (the broker's outbox)
in the order decided; a delivery the shell could not send comes back
through ``undeliver`` and returns to its queue's head, not redelivered.

Queues honour ``x-message-ttl`` and per-message expiration (a message past
its deadline is dropped when it reaches the head of its level, or in
``sweep``, as RabbitMQ does), ``x-expires`` (a queue unused that long is
deleted), ``auto_delete`` (deleted when its last consumer goes) and
``exclusive`` (only its declaring connection may use it, and it goes with
that connection). All messages count in the broker's ``MemoryMeter``.

Durability. With ``durable=True`` (the broker has a store: ``store.py``),
every change to durable state is appended to ``journal`` as an operation
for the store: a persistent message put on a durable queue (``put``), its
first delivery (``dlv``), its end by ack, drop, purge or expiry (``del``),
and durable queues, exchanges and bindings. The core never waits for the
disk; the broker holds back the confirms of publishes until the store has
committed their batch. ``restore`` rebuilds the state from what the store
read back at start.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Callable, Optional

from .._memory import MESSAGE_OVERHEAD
from ..exceptions import NotFound, PreconditionFailed, ProtocolError, QueueFull, ResourceLocked
from .server_queue import MemoryMeter

__all__ = ["Delivery", "Exchange", "Session", "TaskMessage", "TaskQueue", "Tasks"]

logger = logging.getLogger("django_message_broker.server")

PRIORITIES = 10
EXCHANGE_TYPES = ("direct", "topic", "fanout")
#: Longest queue or exchange name (AMQP's short string).
MAX_NAME = 255
#: Most unacknowledged deliveries one session may hold when it sets no prefetch.
MAX_UNACKED = 1 << 20
_PREDECLARED = {"amq.direct": "direct", "amq.topic": "topic", "amq.fanout": "fanout"}


class TaskMessage:
    """One message in a task queue: an opaque body (the publisher's encoded
    kombu message), its priority, deadline and whether it was delivered
    before. ``size`` is what it counts against the memory limit."""

    __slots__ = ("body", "deadline", "delivery", "priority", "ready", "redelivered", "sid", "size")

    def __init__(
        self, body: Any, priority: int = 0, deadline: float = math.inf, redelivered: bool = False, sid: int = 0
    ) -> None:
        #: ``None``: *cold*, its body only on disk (a stored message deep in a
        #: long queue, or read back at start); loaded when it is delivered.
        self.body = body
        self.priority = priority
        self.deadline = deadline
        self.redelivered = redelivered
        #: Its id in the durable store; 0: not stored.
        self.sid = sid
        #: When it was last delivered (``Tasks``' count of deliveries): what
        #: goes back to a queue goes back in the order it left.
        self.delivery = 0
        #: In a queue's ready levels (what the memory meter counts).
        self.ready = False
        #: Bytes it holds in memory: its body (none when cold) and the overhead.
        self.size = MESSAGE_OVERHEAD
        if body is not None:
            self.size += len(body.buffer) if hasattr(body, "buffer") else len(body)

    def __repr__(self) -> str:
        return f"TaskMessage({self.size - MESSAGE_OVERHEAD} bytes, priority={self.priority})"


class Delivery:
    """A message on its way to a session: what the outbox sends (``tag`` and
    ``consumer`` ``""`` for a ``get``) and what ``undeliver`` puts back."""

    __slots__ = ("body", "consumer", "message", "queue", "session", "tag", "tracked")

    def __init__(
        self,
        session: Session,
        tag: int,
        consumer: str,
        queue: TaskQueue,
        message: TaskMessage,
        tracked: bool,
        body: Any = None,
    ) -> None:
        self.session = session
        #: What goes on the wire (read from disk if the message was cold).
        self.body = message.body if body is None else body
        self.tag = tag
        self.consumer = consumer
        self.queue = queue
        self.message = message
        #: Awaits an ack (not ``no_ack``).
        self.tracked = tracked


class Consumer:
    __slots__ = ("no_ack", "queue", "session", "tag")

    def __init__(self, session: Session, tag: str, queue: TaskQueue, no_ack: bool) -> None:
        self.session = session
        self.tag = tag
        self.queue = queue
        self.no_ack = no_ack


class Session:
    """One channel of one connection: its consumers, its prefetch limit and
    the deliveries it has not acknowledged (tag -> (queue, message))."""

    __slots__ = ("client", "consumers", "id", "next_tag", "prefetch", "unacked")

    def __init__(self, client: TaskClient, session_id: int) -> None:
        self.client = client
        self.id = session_id
        self.prefetch = 0  # 0: no limit (but MAX_UNACKED)
        self.next_tag = 1
        self.unacked: dict[int, tuple[TaskQueue, TaskMessage]] = {}
        self.consumers: dict[str, Consumer] = {}

    def room(self) -> int:
        limit = self.prefetch or MAX_UNACKED
        return limit - len(self.unacked)


class TaskClient:
    """What the task model knows of one connection."""

    __slots__ = ("exclusive", "ident", "sessions", "vhost")

    def __init__(self, ident: bytes, vhost: str) -> None:
        self.ident = ident
        self.vhost = vhost
        self.sessions: dict[int, Session] = {}
        self.exclusive: set[str] = set()


class TaskQueue:
    """A named queue: ready messages in priority levels, its consumers in
    round-robin order, and counters."""

    def __init__(
        self,
        name: str,
        *,
        durable: bool = False,
        auto_delete: bool = False,
        owner: Optional[bytes] = None,
        expires: Optional[float] = None,
        message_ttl: Optional[float] = None,
        max_length: Optional[int] = None,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.owner = owner
        self.expires = expires
        self.message_ttl = message_ttl
        self.max_length = max_length
        self.levels: list[deque[TaskMessage]] = [deque() for _ in range(PRIORITIES)]
        self.ready = 0
        self.unacked = 0
        self.consumers: list[Consumer] = []
        self._next = 0
        self.had_consumer = False
        self.last_used = now
        self.published = self.delivered = self.acked = self.redelivered = self.expired = 0

    def __len__(self) -> int:
        return self.ready

    def __repr__(self) -> str:
        return f"<TaskQueue {self.name!r}: {self.ready} ready, {self.unacked} unacked, {len(self.consumers)} consumers>"

    def push(self, message: TaskMessage) -> None:
        self.levels[message.priority].append(message)
        message.ready = True
        self.ready += 1

    def push_front(self, message: TaskMessage) -> None:
        self.levels[message.priority].appendleft(message)
        message.ready = True
        self.ready += 1

    def pop(self, now: float, meter: MemoryMeter, dropped: Optional[list] = None) -> Optional[TaskMessage]:
        """The next live message, highest priority first; expired ones met
        on the way are dropped (and added to ``dropped``)."""
        for level in reversed(self.levels):
            while level:
                message = level.popleft()
                message.ready = False
                self.ready -= 1
                meter.used -= message.size
                if message.deadline > now:
                    return message
                self.expired += 1
                if dropped is not None:
                    dropped.append(message)
        return None

    def expire(self, now: float, meter: MemoryMeter, dropped: Optional[list] = None) -> int:
        """Drop expired messages at the head of each level (adding them to
        ``dropped``)."""
        count = 0
        for level in self.levels:
            while level and level[0].deadline <= now:
                message = level.popleft()
                message.ready = False
                meter.used -= message.size
                count += 1
                if dropped is not None:
                    dropped.append(message)
        self.ready -= count
        self.expired += count
        return count

    def purge(self, meter: MemoryMeter) -> int:
        count = self.ready
        for level in self.levels:
            for message in level:
                message.ready = False
                meter.used -= message.size
            level.clear()
        self.ready = 0
        return count

    def remove_consumer(self, consumer: Consumer) -> bool:
        """Take ``consumer`` out of the turn order (``False``: it was not in
        it); whoever was next stays next."""
        try:
            index = self.consumers.index(consumer)
        except ValueError:
            return False
        del self.consumers[index]
        if index < self._next:
            self._next -= 1
        return True

    def next_consumer(self) -> Optional[Consumer]:
        """The next consumer in turn whose session has room."""
        consumers = self.consumers
        count = len(consumers)
        for i in range(count):
            index = (self._next + i) % count
            consumer = consumers[index]
            if consumer.no_ack or consumer.session.room() > 0:
                self._next = index + 1
                return consumer
        return None


class Exchange:
    """Routes a routing key to the names of bound queues."""

    def __init__(self, name: str, type: str, *, durable: bool = False, auto_delete: bool = False) -> None:
        self.name = name
        self.type = type
        self.durable = durable
        self.auto_delete = auto_delete
        #: (binding key, queue) -> the key's words (topic), in binding order
        self.bindings: dict[tuple[str, str], tuple[str, ...]] = {}
        self._direct: dict[str, list[str]] = {}

    def bind(self, queue: str, routing_key: str) -> None:
        key = (routing_key, queue)
        if key in self.bindings:
            return
        self.bindings[key] = _words(routing_key)
        self._direct.setdefault(routing_key, []).append(queue)

    def unbind(self, queue: str, routing_key: str) -> None:
        if self.bindings.pop((routing_key, queue), None) is not None:
            names = self._direct[routing_key]
            names.remove(queue)
            if not names:
                del self._direct[routing_key]

    def unbind_queue(self, queue: str) -> None:
        for routing_key, name in [key for key in self.bindings if key[1] == queue]:
            self.unbind(name, routing_key)

    def route(self, routing_key: str) -> list[str]:
        if self.type == "direct":
            return self._direct.get(routing_key, [])
        if self.type == "fanout":
            return list(dict.fromkeys(name for _, name in self.bindings))
        words = list(_words(routing_key))
        found = (name for (_, name), pattern in self.bindings.items() if topic_matches(pattern, words))
        return list(dict.fromkeys(found))  # once per queue, in binding order


def _words(key: str) -> tuple[str, ...]:
    """A topic key's words: AMQP's "zero or more words delimited by dots",
    so ``""`` has none (``*`` does not match it) and ``"a..b"`` has three."""
    return tuple(key.split(".")) if key else ()


def topic_matches(pattern: tuple[str, ...] | list[str], words: list[str]) -> bool:
    """AMQP topic matching on dot-separated words: ``*`` is exactly one
    word, ``#`` zero or more. One pass over the words, carrying the set of
    pattern positions reached so far: time linear in each length. (Trying
    every split of the words at each ``#`` takes exponential time on a
    binding such as ``#.#.#.#.#.#.#.#.#.#.b``: one publish froze the broker.)"""
    end = len(pattern)
    reached = _past_hashes(pattern, {0})
    for word in words:
        following = set()
        for i in reached:
            if i < end:
                part = pattern[i]
                if part == "#":
                    following.add(i)  # one more word for this #
                elif part == "*" or part == word:
                    following.add(i + 1)
        if not following:
            return False
        reached = _past_hashes(pattern, following)
    return end in reached


def _past_hashes(pattern: tuple[str, ...] | list[str], reached: set[int]) -> set[int]:
    """``reached`` and the positions after each ``#`` in it (a ``#`` may match no word)."""
    todo = list(reached)
    while todo:
        i = todo.pop()
        if i < len(pattern) and pattern[i] == "#" and i + 1 not in reached:
            reached.add(i + 1)
            todo.append(i + 1)
    return reached


class VHost:
    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, TaskQueue] = {}
        self.exchanges: dict[str, Exchange] = {name: Exchange(name, kind) for name, kind in _PREDECLARED.items()}


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or "\x00" in name:
        raise ProtocolError(f"invalid {what} name {name!r}")
    return name


def _check_routing_key(key: Any) -> str:
    """A routing or binding key is an AMQP short string too (at most 255
    characters): topic matching costs the product of two keys' lengths."""
    if not isinstance(key, str) or len(key) > MAX_NAME:
        raise ProtocolError(f"invalid routing key {key!r:.80}: a string of at most {MAX_NAME} characters")
    return key


def _seconds(arguments: dict, key: str) -> Optional[float]:
    """An ``x-`` argument in milliseconds, as seconds."""
    value = arguments.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e13:
        raise PreconditionFailed(f"invalid {key} {value!r}: a number of milliseconds")
    return value / 1000.0


class Tasks:
    """Every vhost's queues and exchanges, and every connection's sessions.

    Methods raise ``BrokerError`` subclasses (``NotFound``,
    ``ResourceLocked``, ``PreconditionFailed``, ``ProtocolError``,
    ``QueueFull``) for the broker to answer with."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        sink: Callable[[bytes, Delivery], None],
        meter: Optional[MemoryMeter] = None,
        durable: bool = False,
        wall_clock: Callable[[], float] = lambda: 0.0,
        load_body: Callable[[int], Optional[bytes]] = lambda sid: None,
        hot_limit: int = 1000,
    ) -> None:
        self.clock = clock
        #: Reads a cold message's body from the store (by its id).
        self.load_body = load_body
        #: Stored messages past this many ready ones in their queue go cold
        #: once on disk (``cool``): a backlog larger than memory.
        self.hot_limit = hot_limit
        #: (queue, message) of the ``put`` operations in ``journal``.
        self.puts: list[tuple[TaskQueue, TaskMessage]] = []
        self.lost_bodies = 0
        #: Bytes of bodies let go by ``cool`` (the shell returns them to the
        #: operating system now and then, and resets this).
        self.cooled_bytes = 0
        #: Wall-clock time, for deadlines kept on disk (they cross restarts).
        self.wall_clock = wall_clock
        self.sink = sink
        self.meter = meter or MemoryMeter()
        #: Durable state goes to ``journal`` for the store (see the module docstring).
        self.durable = durable
        self.journal: list[tuple] = []
        self.next_sid = 1
        #: Whether the last ``publish`` journaled a message (its confirm waits for the store).
        self.stored = False
        self._warned_in_memory = False
        self.vhosts: dict[str, VHost] = {}
        self.clients: dict[bytes, TaskClient] = {}
        self.unroutable = 0
        self.expired = 0
        self._deliveries = 0

    # -- connections and sessions --------------------------------------------
    def open(self, ident: bytes, vhost: str) -> None:
        """A connection starts using task queues in ``vhost`` (again: a
        reconnecting connection starts afresh)."""
        _check_name(vhost, "vhost")
        self.drop_client(ident)
        self.clients[ident] = TaskClient(ident, vhost)
        if vhost not in self.vhosts:
            self.vhosts[vhost] = VHost(vhost)

    def _client(self, ident: bytes) -> TaskClient:
        client = self.clients.get(ident)
        if client is None:
            raise ProtocolError("task commands need an Open first")
        return client

    def _session(self, client: TaskClient, session_id: int) -> Session:
        session = client.sessions.get(session_id)
        if session is None:
            if type(session_id) is not int or not 0 <= session_id < 1 << 16:
                raise ProtocolError(f"invalid session {session_id!r}")
            session = client.sessions[session_id] = Session(client, session_id)
        return session

    def _vhost(self, client: TaskClient) -> VHost:
        return self.vhosts[client.vhost]

    def _queue(self, client: TaskClient, name: str) -> TaskQueue:
        queue = self._vhost(client).queues.get(name)
        if queue is None:
            raise NotFound(f"no queue {name!r} in vhost {client.vhost!r}", "queue", name)
        if queue.owner is not None and queue.owner != client.ident:
            raise ResourceLocked(f"queue {name!r} is exclusive to another connection", name)
        return queue

    # -- exchanges ------------------------------------------------------------
    def declare_exchange(
        self,
        ident: bytes,
        name: str,
        type: str,
        *,
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
    ) -> None:
        client = self._client(ident)
        _check_name(name, "exchange")
        exchanges = self._vhost(client).exchanges
        existing = exchanges.get(name)
        if passive:
            if existing is None and name:
                raise NotFound(f"no exchange {name!r} in vhost {client.vhost!r}", "exchange", name)
            return
        if not name:
            raise PreconditionFailed("the default exchange cannot be declared")
        if type not in EXCHANGE_TYPES:
            raise PreconditionFailed(f"exchange type {type!r} is not one of {', '.join(EXCHANGE_TYPES)}")
        if existing is None:
            exchanges[name] = Exchange(name, type, durable=durable, auto_delete=auto_delete)
            if durable and self.durable:
                self.journal.append(("x+", client.vhost, name, type, int(auto_delete)))
        elif existing.type != type:
            raise PreconditionFailed(f"exchange {name!r} exists with type {existing.type!r}, not {type!r}")

    def delete_exchange(self, ident: bytes, name: str, *, if_unused: bool = False) -> None:
        client = self._client(ident)
        exchanges = self._vhost(client).exchanges
        exchange = exchanges.get(name)
        if exchange is None:
            return
        if if_unused and exchange.bindings:
            raise PreconditionFailed(f"exchange {name!r} is in use")
        del exchanges[name]
        if exchange.durable and self.durable:
            self.journal.append(("x-", client.vhost, name))
            for routing_key, queue in exchange.bindings:
                self.journal.append(("b-", client.vhost, name, queue, routing_key))

    # -- queues ---------------------------------------------------------------
    def declare_queue(
        self,
        ident: bytes,
        name: str,
        *,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Optional[dict] = None,
    ) -> tuple[str, int, int]:
        """Returns (name, ready messages, consumers), as AMQP's declare-ok."""
        client = self._client(ident)
        _check_name(name, "queue")
        queues = self._vhost(client).queues
        now = self.clock()
        if passive:
            queue = self._queue(client, name)
            queue.last_used = now
            return name, queue.ready, len(queue.consumers)
        if not name:
            raise PreconditionFailed("a queue needs a name (the transport names anonymous queues)")
        arguments = arguments or {}
        if not isinstance(arguments, dict):
            raise ProtocolError("queue arguments must be a map")
        existing = queues.get(name)
        if existing is not None:
            self._queue(client, name)  # exclusive to another: ResourceLocked
            existing.last_used = now
            return name, existing.ready, len(existing.consumers)
        max_length = arguments.get("x-max-length")
        if max_length is not None and (type(max_length) is not int or max_length < 0):
            raise PreconditionFailed(f"invalid x-max-length {max_length!r}")
        expires = _seconds(arguments, "x-expires")
        if expires == 0:  # as RabbitMQ: the queue would go at the next sweep, however used
            raise PreconditionFailed("invalid x-expires 0: a positive number of milliseconds")
        queue = TaskQueue(
            name,
            durable=durable,
            auto_delete=auto_delete,
            owner=ident if exclusive else None,
            expires=expires,
            message_ttl=_seconds(arguments, "x-message-ttl"),
            max_length=max_length,
            now=now,
        )
        queues[name] = queue
        if exclusive:
            client.exclusive.add(name)
        elif durable:
            if self.durable:
                self.journal.append(("q+", client.vhost, name, json.dumps(arguments), int(auto_delete)))
            elif not self._warned_in_memory:
                self._warned_in_memory = True
                logger.info(
                    "durable queue %r: kept in memory only (the broker has no --data-dir); this is said once", name
                )
        return name, 0, 0

    def bind(self, ident: bytes, queue: str, exchange: str, routing_key: str) -> None:
        client = self._client(ident)
        _check_routing_key(routing_key)
        target_queue = self._queue(client, queue)
        target = self._exchange(client, exchange)
        if (routing_key, queue) not in target.bindings and self._stored_binding(target, target_queue):
            self.journal.append(("b+", client.vhost, exchange, queue, routing_key))
        target.bind(queue, routing_key)

    def unbind(self, ident: bytes, queue: str, exchange: str, routing_key: str) -> None:
        client = self._client(ident)
        target = self._vhost(client).exchanges.get(exchange)
        if target is not None:
            if (routing_key, queue) in target.bindings and self.durable:
                self.journal.append(("b-", client.vhost, exchange, queue, routing_key))
            target.unbind(queue, routing_key)

    def _stored_binding(self, exchange: Exchange, queue: TaskQueue) -> bool:
        return self.durable and queue.durable and (exchange.durable or exchange.name in _PREDECLARED)

    def _exchange(self, client: TaskClient, name: str) -> Exchange:
        exchange = self._vhost(client).exchanges.get(name)
        if exchange is None:
            raise NotFound(f"no exchange {name!r} in vhost {client.vhost!r}", "exchange", name)
        return exchange

    def purge(self, ident: bytes, name: str) -> int:
        """Drop the queue's ready messages (not the unacknowledged ones)."""
        queue = self._queue(self._client(ident), name)
        self._forget_stored(m for level in queue.levels for m in level)
        return queue.purge(self.meter)

    def delete_queue(self, ident: bytes, name: str, *, if_unused: bool = False, if_empty: bool = False) -> int:
        client = self._client(ident)
        if name not in self._vhost(client).queues:
            return 0
        queue = self._queue(client, name)
        if if_unused and queue.consumers:
            raise PreconditionFailed(f"queue {name!r} has consumers")
        if if_empty and queue.ready:
            raise PreconditionFailed(f"queue {name!r} is not empty")
        return self._delete(self._vhost(client), queue)

    def _delete(self, vhost: VHost, queue: TaskQueue) -> int:
        if queue.durable and self.durable and vhost.queues.get(queue.name) is queue:
            self.journal.append(("q-", vhost.name, queue.name))  # with its messages and bindings
        count = queue.purge(self.meter)
        for consumer in queue.consumers:
            consumer.session.consumers.pop(consumer.tag, None)
        queue.consumers = []
        for exchange in vhost.exchanges.values():
            exchange.unbind_queue(queue.name)
        if vhost.queues.get(queue.name) is queue:
            del vhost.queues[queue.name]
        if queue.owner is not None:
            owner = self.clients.get(queue.owner)
            if owner is not None:
                owner.exclusive.discard(queue.name)
        return count

    def size(self, ident: bytes, name: str) -> int:
        return self._queue(self._client(ident), name).ready

    # -- publishing -----------------------------------------------------------
    def publish(
        self,
        ident: bytes,
        exchange: str,
        routing_key: str,
        body: Any,
        priority: int,
        ttl: float,
        persistent: bool = False,
    ) -> int:
        """Route ``body`` and queue it on every matching queue; returns how
        many queues took it (0: unroutable, dropped and counted, as AMQP
        does without ``mandatory``). ``ttl``: seconds, 0 for none. A
        ``persistent`` message on a durable queue is journaled for the store
        (``stored`` tells the caller whether this publish was)."""
        self.stored = False
        client = self._client(ident)
        _check_routing_key(routing_key)
        if type(priority) is not int:
            raise ProtocolError(f"priority must be an integer, not {priority!r}")
        priority = min(max(priority, 0), PRIORITIES - 1)
        if not (ttl == 0 or 0 < ttl < math.inf):
            raise ProtocolError(f"ttl must be 0 (none) or a positive number of seconds, not {ttl!r}")
        vhost = self._vhost(client)
        if exchange:
            target = vhost.exchanges.get(exchange)
            names = target.route(routing_key) if target is not None else []
        else:
            names = [routing_key] if routing_key in vhost.queues else []
        if not names:
            self.unroutable += 1
            return 0
        now = self.clock()
        targets = [vhost.queues[name] for name in names if name in vhost.queues]
        messages = []
        for queue in targets:
            if queue.max_length is not None and queue.ready >= queue.max_length:
                self.expired += queue.expire(now, self.meter)  # expired messages make room first
                if queue.ready >= queue.max_length:
                    raise QueueFull(queue.name, queue.max_length)
            deadline = now + ttl if ttl else math.inf
            if queue.message_ttl is not None:
                deadline = min(deadline, now + queue.message_ttl)
            messages.append(TaskMessage(body, priority, deadline))
        if not self.meter.fits(sum(m.size for m in messages)):
            raise QueueFull(routing_key, 0, "broker memory limit reached")
        for queue, message in zip(targets, messages, strict=True):
            if persistent and queue.durable and self.durable:
                self._store(client.vhost, queue, message, now)
            queue.push(message)
            self.meter.used += message.size
            queue.published += 1
            if queue.consumers:
                self._dispatch(queue)
        routed = len(targets)
        return routed

    def _store(self, vhost: str, queue: TaskQueue, message: TaskMessage, now: float) -> None:
        message.sid = self.next_sid
        self.next_sid += 1
        body = message.body
        data = body if type(body) is bytes else bytes(memoryview(body))
        expires = None if message.deadline == math.inf else self.wall_clock() + (message.deadline - now)
        self.journal.append(("put", message.sid, vhost, queue.name, message.priority, expires, data))
        self.puts.append((queue, message))
        self.stored = True

    def _forget_stored(self, messages: Iterable[TaskMessage]) -> None:
        if self.durable:
            self.journal.extend(("del", m.sid) for m in messages if m.sid)

    # -- consuming ------------------------------------------------------------
    def consume(self, ident: bytes, session_id: int, queue_name: str, tag: str, *, no_ack: bool = False) -> None:
        client = self._client(ident)
        session = self._session(client, session_id)
        if not isinstance(tag, str) or not tag or len(tag) > MAX_NAME:
            raise ProtocolError(f"invalid consumer tag {tag!r}")
        if tag in session.consumers:
            raise PreconditionFailed(f"consumer tag {tag!r} is in use on this channel")
        queue = self._queue(client, queue_name)
        consumer = Consumer(session, tag, queue, no_ack)
        session.consumers[tag] = consumer
        queue.consumers.append(consumer)
        queue.had_consumer = True
        queue.last_used = self.clock()
        self._dispatch(queue)

    def cancel(self, ident: bytes, session_id: int, tag: str) -> None:
        client = self._client(ident)
        session = client.sessions.get(session_id)
        consumer = session.consumers.pop(tag, None) if session is not None else None
        if consumer is not None:
            self._remove_consumer(consumer)

    def _remove_consumer(self, consumer: Consumer) -> None:
        queue = consumer.queue
        if not queue.remove_consumer(consumer):
            return
        queue.last_used = self.clock()
        if queue.auto_delete and not queue.consumers and queue.had_consumer:
            vhost = self.vhosts.get(consumer.session.client.vhost)
            if vhost is not None:
                self._delete(vhost, queue)

    def qos(self, ident: bytes, session_id: int, prefetch: int) -> None:
        if type(prefetch) is not int or not 0 <= prefetch <= MAX_UNACKED:
            raise ProtocolError(f"prefetch must be in [0, {MAX_UNACKED}], not {prefetch!r}")
        session = self._session(self._client(ident), session_id)
        session.prefetch = prefetch
        self._wake(session)

    def get(self, ident: bytes, session_id: int, queue_name: str, *, no_ack: bool = False) -> Optional[Delivery]:
        """``basic_get``: the next message, or ``None``."""
        client = self._client(ident)
        session = self._session(client, session_id)
        queue = self._queue(client, queue_name)
        queue.last_used = self.clock()
        expired: list[TaskMessage] = []
        while True:
            message = queue.pop(self.clock(), self.meter, expired)
            if message is None:
                self._forget_stored(expired)
                return None
            body = self._body_of(message)
            if body is not None:
                break
        self._forget_stored(expired)
        return self._delivery(session, "", queue, message, no_ack, body)

    def _body_of(self, message: TaskMessage) -> Any:
        """The message's body, read from the store if it is cold (``None``:
        the store no longer has it, which only a damaged store explains)."""
        if message.body is not None:
            return message.body
        body = self.load_body(message.sid)
        if body is None:
            self.lost_bodies += 1
            logger.error("durable store: message %d is not on disk any more: dropped", message.sid)
        return body

    def _delivery(
        self, session: Session, consumer: str, queue: TaskQueue, message: TaskMessage, no_ack: bool, body: Any = None
    ) -> Delivery:
        tag = session.next_tag
        session.next_tag += 1
        queue.delivered += 1
        self._deliveries += 1
        message.delivery = self._deliveries
        if not no_ack:
            session.unacked[tag] = (queue, message)
            queue.unacked += 1
            if message.sid and not message.redelivered:
                self.journal.append(("dlv", message.sid))  # after a restart it comes back redelivered
        elif message.sid:
            self.journal.append(("del", message.sid))
        return Delivery(session, tag, consumer, queue, message, not no_ack, body)

    def _dispatch(self, queue: TaskQueue) -> None:
        """Hand ready messages to consumers with room, in turn."""
        now = self.clock()
        expired: list[TaskMessage] = []
        while queue.ready:
            consumer = queue.next_consumer()
            if consumer is None:
                break
            message = queue.pop(now, self.meter, expired)
            if message is None:
                break
            body = self._body_of(message)
            if body is None:
                continue
            session = consumer.session
            delivery = self._delivery(session, consumer.tag, queue, message, consumer.no_ack, body)
            self.sink(session.client.ident, delivery)
        if expired:
            self._forget_stored(expired)

    def _wake(self, session: Session) -> None:
        """The session has room again: its queues may deliver."""
        for queue in {id(c.queue): c.queue for c in session.consumers.values()}.values():
            if queue.ready:
                self._dispatch(queue)

    # -- acknowledgements -----------------------------------------------------
    def ack(self, ident: bytes, session_id: int, tags: Iterable[int], *, multiple: bool = False) -> None:
        session = self._session(self._client(ident), session_id)
        for tag in self._tags(session, tags, multiple):
            entry = session.unacked.pop(tag, None)
            if entry is not None:
                queue, message = entry
                queue.unacked -= 1
                queue.acked += 1
                if message.sid:
                    self.journal.append(("del", message.sid))
        self._wake(session)

    def reject(
        self, ident: bytes, session_id: int, tags: Iterable[int], *, requeue: bool, multiple: bool = False
    ) -> None:
        session = self._session(self._client(ident), session_id)
        chosen = self._tags(session, tags, multiple)
        self._give_back(session, chosen, drop=not requeue)
        self._wake(session)

    def recover(self, ident: bytes, session_id: int) -> None:
        """Put every unacknowledged message of the session back (AMQP's
        ``basic.recover(requeue=True)``)."""
        session = self._session(self._client(ident), session_id)
        self._give_back(session, list(session.unacked))
        self._wake(session)

    @staticmethod
    def _tags(session: Session, tags: Iterable[int], multiple: bool) -> list[int]:
        tags = list(tags)
        if any(type(t) is not int for t in tags):
            raise ProtocolError("delivery tags are integers")
        if multiple:  # every tag up to the largest given, as AMQP's multiple flag
            top = max(tags, default=0)
            if tags and top == 0:  # AMQP: multiple with tag 0 is every outstanding one
                return list(session.unacked)
            return [t for t in session.unacked if t <= top]
        return tags

    def _give_back(self, session: Session, tags: list[int], *, drop: bool = False, redelivered: bool = True) -> None:
        """Unacknowledged messages go back to the head of their queues (or
        are dropped)."""
        vhost = session.client.vhost
        self._put_back(
            [(vhost, *session.unacked.pop(tag), True) for tag in tags if tag in session.unacked], drop, redelivered
        )

    def _put_back(
        self, entries: list[tuple[str, TaskQueue, TaskMessage, bool]], drop: bool = False, redelivered: bool = True
    ) -> None:
        """Put (vhost, queue, message, tracked) back at the head of each
        queue, in the order they were delivered (the earliest in front),
        whatever session held them; ``tracked`` ones leave the queue's
        unacknowledged count. Then the queues deliver again."""
        entries.sort(key=lambda entry: entry[2].delivery)
        touched: dict[int, TaskQueue] = {}
        for vhost, queue, message, tracked in reversed(entries):
            if tracked:
                queue.unacked -= 1
            if drop or self._queue_gone(vhost, queue):
                if message.sid:
                    self.journal.append(("del", message.sid))
                continue
            message.redelivered = message.redelivered or redelivered
            queue.push_front(message)
            self.meter.used += message.size
            if redelivered:
                queue.redelivered += 1
            touched[id(queue)] = queue
        for queue in touched.values():
            if queue.consumers:
                self._dispatch(queue)

    def _queue_gone(self, vhost_name: str, queue: TaskQueue) -> bool:
        vhost = self.vhosts.get(vhost_name)
        return vhost is None or vhost.queues.get(queue.name) is not queue

    def close_session(self, ident: bytes, session_id: int) -> None:
        """The channel closed: its consumers end and what it holds goes back."""
        client = self.clients.get(ident)
        if client is None:
            return
        session = client.sessions.pop(session_id, None)
        if session is not None:
            self._end_session(session)

    def _end_session(self, session: Session) -> None:
        self._end_consumers(session)
        self._give_back(session, list(session.unacked))

    def _end_consumers(self, session: Session) -> None:
        consumers, session.consumers = list(session.consumers.values()), {}
        for consumer in consumers:
            self._remove_consumer(consumer)

    def drop_client(self, ident: bytes) -> int:
        """The connection is gone (closed, dead, or reconnecting afresh):
        its unacknowledged messages go back to the head of their queues,
        its consumers end, its exclusive queues go. Returns how many
        messages went back."""
        client = self.clients.pop(ident, None)
        if client is None:
            return 0
        sessions = list(client.sessions.values())
        client.sessions.clear()
        # Every consumer first, so that nothing given back is delivered to
        # another session of this same connection; then everything back at
        # once, in the order it was delivered across its sessions.
        for session in sessions:
            self._end_consumers(session)
        held = [(client.vhost, *entry, True) for session in sessions for entry in session.unacked.values()]
        for session in sessions:
            session.unacked.clear()
        self._put_back(held)
        vhost = self.vhosts.get(client.vhost)
        if vhost is not None:
            for name in list(client.exclusive):
                queue = vhost.queues.get(name)
                if queue is not None:
                    self._delete(vhost, queue)
        if held:
            logger.info("connection %r is gone: %d unacknowledged message(s) go back to their queues", ident, len(held))
        return len(held)

    def holds(self, ident: bytes) -> bool:
        """Whether the connection has consumers or unacknowledged messages."""
        client = self.clients.get(ident)
        return client is not None and any(s.unacked or s.consumers for s in client.sessions.values())

    # -- the shell's side -----------------------------------------------------
    def undeliver(self, deliveries: Iterable[Delivery]) -> None:
        """Deliveries the shell could not send go back to the head of their
        queues, not marked redelivered (they never arrived), in the order
        they were delivered."""
        entries = []
        for delivery in deliveries:
            session, message = delivery.session, delivery.message
            if delivery.tracked:  # unless acked or given back already (its client is gone)
                if session.unacked.get(delivery.tag, (None, None))[1] is message:
                    del session.unacked[delivery.tag]
                    entries.append((session.client.vhost, delivery.queue, message, True))
            else:
                entries.append((session.client.vhost, delivery.queue, message, False))
        self._put_back(entries, redelivered=False)

    def retry(self) -> None:
        """Deliver again wherever a consumer has room (after sends failed)."""
        for vhost in self.vhosts.values():
            for queue in list(vhost.queues.values()):
                if queue.ready and queue.consumers:
                    self._dispatch(queue)

    def sweep(self, now: float) -> None:
        """Expire messages and unused queues (``x-expires``)."""
        for vhost in self.vhosts.values():
            for queue in list(vhost.queues.values()):
                if queue.ready:
                    expired: list[TaskMessage] = []
                    self.expired += queue.expire(now, self.meter, expired)
                    self._forget_stored(expired)
                if queue.expires is not None and not queue.consumers and now - queue.last_used >= queue.expires:
                    logger.debug("queue %r unused for %gs: deleted", queue.name, queue.expires)
                    self._delete(vhost, queue)

    # -- the store's side -----------------------------------------------------
    def take_journal(self) -> tuple[list[tuple], list[tuple[TaskQueue, TaskMessage]]]:
        """The operations for the store, and the messages they put (for
        ``cool`` once the store has them)."""
        journal, self.journal = self.journal, []
        puts, self.puts = self.puts, []
        return journal, puts

    def cool(self, puts: Iterable[tuple[TaskQueue, TaskMessage]]) -> int:
        """These messages are on disk now: those still waiting behind more
        than ``hot_limit`` others in their queue let go of their body (read
        back when delivered). Returns how many went cold."""
        count = 0
        behind: dict[int, int] = {}  # queue -> messages of these puts behind this one
        for queue, message in reversed(list(puts)):
            if not message.ready:
                continue  # delivered (or gone) already
            later = behind.get(id(queue), 0)
            behind[id(queue)] = later + 1
            # Its place from the head, at most (later batches may be behind it too).
            if message.body is not None and queue.ready - 1 - later >= self.hot_limit:
                self.cooled_bytes += message.size - MESSAGE_OVERHEAD
                self.meter.used -= message.size - MESSAGE_OVERHEAD
                message.size = MESSAGE_OVERHEAD
                message.body = None
                count += 1
        return count

    def restore(self, state: Any) -> int:
        """Rebuild durable queues, exchanges, bindings and messages from a
        ``store.StoredState``; returns how many messages came back. Messages
        past their deadline are dropped (and forgotten by the store)."""
        now, wall = self.clock(), self.wall_clock()
        for vhost_name, name, arguments, auto_delete in state.queues:
            vhost = self.vhosts.setdefault(vhost_name, VHost(vhost_name))
            vhost.queues[name] = TaskQueue(
                name,
                durable=True,
                auto_delete=auto_delete,
                expires=_seconds(arguments, "x-expires"),
                message_ttl=_seconds(arguments, "x-message-ttl"),
                max_length=arguments.get("x-max-length"),
                now=now,
            )
        for vhost_name, name, kind, auto_delete in state.exchanges:
            vhost = self.vhosts.setdefault(vhost_name, VHost(vhost_name))
            vhost.exchanges[name] = Exchange(name, kind, durable=True, auto_delete=auto_delete)
        for vhost_name, exchange, queue, routing_key in state.bindings:
            target = self.vhosts.get(vhost_name)
            if target is not None and exchange in target.exchanges and queue in target.queues:
                target.exchanges[exchange].bind(queue, routing_key)
        restored = 0
        for sid, vhost_name, queue_name, priority, expires, delivered, body in state.messages:
            self.next_sid = max(self.next_sid, sid + 1)
            target = self.vhosts.get(vhost_name)
            queue = target.queues.get(queue_name) if target is not None else None
            if queue is None or (expires is not None and expires <= wall):
                self.journal.append(("del", sid))
                continue
            deadline = math.inf if expires is None else now + (expires - wall)
            # Read back cold: the body stays on disk until a delivery needs it.
            message = TaskMessage(body, min(max(priority, 0), PRIORITIES - 1), deadline, delivered, sid)
            queue.push(message)
            self.meter.used += message.size
            restored += 1
        return restored

    # -- introspection --------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        queues = [q for v in self.vhosts.values() for q in v.queues.values()]
        return {
            "task_queues": len(queues),
            "task_ready": sum(q.ready for q in queues),
            "task_unacked": sum(q.unacked for q in queues),
            "task_consumers": sum(len(q.consumers) for q in queues),
            "task_unroutable": self.unroutable,
        }

    def queue_stats(self, vhost: str = "/") -> list[dict[str, Any]]:
        host = self.vhosts.get(vhost)
        if host is None:
            return []
        return [
            {
                "name": q.name,
                "ready": q.ready,
                "unacked": q.unacked,
                "consumers": len(q.consumers),
                "published": q.published,
                "delivered": q.delivered,
                "acked": q.acked,
                "redelivered": q.redelivered,
                "expired": q.expired,
            }
            for q in host.queues.values()
        ]
