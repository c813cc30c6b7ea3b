"""Server queue: one FIFO per channel, delivered round robin to its endpoints.

How it works. A ``ChannelQueue`` holds the channel's messages (a deque, FIFO)
and its endpoints (a ``RoundRobinDict``, in subscription order). Each
endpoint holds *credit*: how many more messages it may be sent. ``None`` is
unlimited (what ``subscribe`` grants, as in the documented API); the broker
uses ``grant`` so that an endpoint receives only what its process asked
for. ``deliver`` pops messages and hands each run for one endpoint to a
*sink*: the broker passes its ``Outbox`` (``deliver(sink=outbox)``), which
only collects; without a sink the run is sent on ``endpoint.socket`` (a
ROUTER) without blocking, as the documented API does. A run that cannot go
comes back through ``requeue``, the one place that puts it back at the
*head* of the queue (FIFO holds across retries), takes it off ``held``, and
drops the endpoint (peer gone) or restores its credit (peer busy).

Time comes from the queue's clock (monotonic seconds; ``clock=`` injects a
fake one). Nothing here starts a task or a timer: the broker drives
``deliver`` and one broker-wide sweeper calls ``expire(now)`` and
``expire_endpoints(now)`` (the documented ``_flush_messages`` and
``_flush_subscribers`` call them). ``event_loop`` is there for code that
wants a queue to run on its own; awaiting it is opt-in. This module
imports neither asyncio nor zmq when loaded: ``event_loop``,
``pull_and_send`` and the standalone send import them when called.

Process channels (name contains ``!``) have exactly one endpoint.

Memory. Every message that enters ``queue`` adds its ``size`` to the
queue's ``meter`` and every one that leaves (delivered, expired, cleared)
takes it off; the broker gives all its queues one shared ``MemoryMeter``
and so knows the bytes it holds queued. Change ``queue`` only through the
methods here (``push``, ``push_front``, ``put_back``, ``requeue``,
``deliver``, ``expire``, ``clear``) so the count stays exact.
"""

from __future__ import annotations

import math
import time
from collections import UserDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, Deque, FrozenSet, List, Optional, Protocol, Union

from ..exceptions import QueueFull, SubscriptionError
from ..protocol import MAX_BATCH, MAX_CREDIT, Deliver, encode
from .data_message import DataMessage

if TYPE_CHECKING:
    import asyncio

    import zmq

__all__ = ["ChannelQueue", "DataMessage", "Endpoint", "MemoryMeter", "RoundRobinDict", "Sink", "SubscriptionError"]

# zmq.NOBLOCK and zmq.NOBLOCK | zmq.SNDMORE (libzmq's ABI: fixed values).
_NOBLOCK, _MORE_NOBLOCK = 1, 3


class Sink(Protocol):
    """Where ``ChannelQueue.deliver`` hands its runs (the broker's ``Outbox``).
    Taking a run is final for the queue: the messages are out of it and
    ``held`` by the endpoint; a run that then fails to go comes back through
    ``ChannelQueue.requeue``."""

    def defer(self, queue: ChannelQueue, endpoint: Endpoint, messages: list[DataMessage]) -> None: ...


class MemoryMeter:
    """Bytes of queued messages (``DataMessage.size``), shared by queues.
    ``limit`` is the most the owner lets in (``None``: no limit); the queues
    only count, the owner decides."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: Optional[int] = None) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.limit is None or self.used + size <= self.limit

    def __repr__(self) -> str:
        return f"<MemoryMeter {self.used} of {self.limit} bytes>"


@dataclass
class Endpoint:
    """Provides routing information for subscribers.

    Attributes:
        socket: zmq.ROUTER socket (anything with ``send_multipart``) to which messages are sent.
        dealer: Routing frames of the zmq.DEALER to which messages are sent.
        subscriber_name: Name of the channel the endpoint subscribes to.
        is_process_channel: The channel is a process channel (one delivery endpoint).
        time_to_live: Seconds before the endpoint is discarded; ``None``: never.
        expiry: Wall-clock time when the endpoint will expire (for people;
            decisions use the monotonic ``deadline``).
    """

    socket: Union[zmq.Socket, Any]
    dealer: List = field(default_factory=list)
    subscriber_name: bytes = b""
    is_process_channel: bool = False
    time_to_live: Optional[int] = 86400
    expiry: Optional[datetime] = None
    #: Deliveries this endpoint may still be sent; ``None`` is unlimited.
    credit: Optional[int] = field(default=None, init=False, repr=False, compare=False)
    #: Messages delivered to this endpoint that its process has not yet
    #: reported consumed or handed back (see ``ChannelQueue.held``).
    held: int = field(default=0, init=False, repr=False, compare=False)
    #: Monotonic deadline (from the queue's clock); ``inf`` never expires.
    deadline: float = field(default=math.inf, init=False, repr=False, compare=False)

    @property
    def id(self) -> FrozenSet:
        """Returns a unique endpoint id from the routing information and channel name."""
        return frozenset((*self.dealer, self.subscriber_name))

    @property
    def ready(self) -> bool:
        """True while the endpoint may be sent another message."""
        return self.credit is None or self.credit > 0


class RoundRobinDict(UserDict):
    """Dictionary of endpoints that returns the next endpoint when a next value
    is requested and continues from the start of the list when the end of the
    list is reached.

    Notes:
        1. Returns the value of the dictionary entry, not the key.
        2. StopIteration is not raised when the dictionary rolls over to the start.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._keys: Optional[list] = None  # cached insertion order
        self.index = 0  # position of the value the next __next__ returns
        super().__init__(*args, **kwargs)

    def _key_list(self) -> list:
        if self._keys is None:
            self._keys = list(self.data)
        return self._keys

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self.data:
            self._keys = None
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        if key not in self.data:
            raise KeyError(key)
        if self._key_list().index(key) < self.index:
            self.index -= 1
        del self.data[key]
        self._keys = None

    def move_to_end(self, key: Any) -> None:
        """Move an entry to the end of the round (as if newly inserted)."""
        value = self.data[key]
        del self[key]
        self[key] = value

    def __next__(self) -> Optional[Endpoint]:
        """Gets the next value of the next entry in the dictionary, returns to
        the first entry once the end of the dictionary is reached. Values are
        returned by insertion order, starting with the first."""
        if not self.data:
            return None
        keys = self._key_list()
        if self.index >= len(keys):
            self.index = 0
        value = self.data[keys[self.index]]
        self.index += 1
        return value  # type: ignore[no-any-return]

    def _unget(self) -> None:
        """The value the last ``__next__`` returned comes again next."""
        if self.index > 0:
            self.index -= 1

    def next_ready(self) -> Optional[Endpoint]:
        """The next endpoint in round-robin order that has credit, if any:
        ``__next__`` until one is ``ready``, at most once round. Inlined: it
        runs once per group member and per delivered run."""
        data = self.data
        count = len(data)
        keys = self._keys
        if keys is None:
            keys = self._keys = list(data)
        index = self.index
        for _ in range(count):
            if index >= count:
                index = 0
            endpoint = data[keys[index]]
            index += 1
            credit = endpoint.credit
            if credit is None or credit > 0:
                self.index = index
                return endpoint  # type: ignore[no-any-return]
        self.index = index
        return None

    def first_key(self) -> Optional[Any]:
        """Returns the first key in the dictionary by insertion order."""
        return next(iter(self.data), None)


class ChannelQueue:
    """Provides a managed queue for storing and forwarding messages to
    endpoints. Messages are delivered to endpoints round robin, in the order
    the endpoints subscribed; an endpoint that subscribes again moves to the
    end of the round.

    Channel queues are Process Channels when their name contains ``!``:
    they have only one endpoint. Adding another endpoint, or changing it,
    raises ``SubscriptionError``.

    Raises:
        SubscriptionError: Attempt to add multiple endpoints or change the endpoint of a Process Channel
    """

    #: Seconds ``pull_and_send`` waits after a send that found the peer busy.
    penalty: float = 0.1

    def __init__(
        self,
        channel_name: bytes = b"",
        max_length: Optional[int] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        meter: Optional[MemoryMeter] = None,
    ) -> None:
        self.channel_name = channel_name
        self.name = channel_name.decode("utf-8", "replace")
        self.is_process_channel = b"!" in channel_name
        self.max_length = max_length
        #: Monotonic clock, in seconds.
        self.clock = clock
        self.queue: Deque[DataMessage] = deque()
        #: No message in ``queue`` expires before this (a lower bound, exact
        #: after ``expire``): ``expire`` costs nothing until then, where it
        #: used to look at every message (a full channel is asked on every
        #: send to it, and the sweep asks every channel ten times a second).
        self.next_deadline = math.inf
        #: Counts the bytes of ``queue`` (the broker shares one broker-wide).
        self.meter = MemoryMeter() if meter is None else meter
        self.subscribers = RoundRobinDict()
        #: Messages that left the queue for an endpoint and are not yet
        #: consumed there: still "in the channel" for its capacity (the
        #: broker's ``depth``), though no longer in this queue's memory.
        self.held = 0
        #: True when a send found a peer busy; the owner should retry later.
        self.stalled = False
        self.expired = 0  # messages dropped unsent at their deadline
        # Counters for ``Broker.stats`` (plain ints: one addition per message
        # or per run on the hot path). They count since this queue was made;
        # the broker forgets an empty queue nobody receives from, and adds
        # its counts to its own totals then.
        #: Messages sent to the channel and queued (counted by the broker,
        #: once per command: not in ``push``, which stays as it was).
        self.enqueued = 0
        #: Messages handed to endpoints (a run that fails to go is taken off).
        self.delivered = 0
        #: Messages refused at capacity or at the hard cap (counted by the broker).
        self.refused_full = 0
        self.stopped = False
        #: An endpoint with a ``time_to_live`` ever subscribed here: only then
        #: can ``expire_endpoints`` find one to drop (the broker's endpoints
        #: never expire, and its sweep visits every queue once a second).
        self.endpoints_expire = False
        self._events: Optional[tuple[asyncio.Event, asyncio.Event]] = None
        self._task: Optional[asyncio.Task] = None

    def __repr__(self) -> str:
        return f"<ChannelQueue {self.name!r}: {len(self.queue)} messages, {len(self.subscribers)} endpoints>"

    def stop(self) -> None:
        """Stop the queue's event loop, if one runs. Idempotent."""
        self.stopped = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    # -- events (only made when someone runs event_loop) ------------------
    def _set_subscribers_available(self) -> None:
        """Set (or clear) asyncio event if there are subscribers to the queue."""
        if self._events is not None:
            event = self._events[0]
            event.set() if any(e.ready for e in self.subscribers.values()) else event.clear()

    def _set_messages_available(self) -> None:
        """Set (or clear) asyncio event if there are messages in the queue."""
        if self._events is not None:
            event = self._events[1]
            event.set() if self.queue else event.clear()

    def is_empty(self) -> bool:
        """Returns true if there are no subscribers and no messages."""
        return not (self.subscribers or self.queue)

    @property
    def depth(self) -> int:
        """What counts against the channel's capacity: the messages queued
        here and those delivered and not yet consumed (``held``)."""
        return len(self.queue) + self.held

    def release(self, endpoint: Endpoint, count: int) -> int:
        """``count`` messages held by ``endpoint`` were consumed or handed
        back; returns how many it really held (never below zero)."""
        count = min(count, endpoint.held)
        endpoint.held -= count
        self.held -= count
        return count

    async def event_loop(self) -> None:
        """Queue event loop. Waits for subscribers, and if there are messages
        in the queue pulls them from the queue and sends them to the
        subscribers. Runs until ``stop()``."""
        import asyncio

        if self.stopped:
            return
        self._task = asyncio.current_task()
        self._events = (asyncio.Event(), asyncio.Event())
        self._set_subscribers_available()
        self._set_messages_available()
        subscribers, messages = self._events
        try:
            while not self.stopped:
                await subscribers.wait()
                await messages.wait()
                await self.pull_and_send()
        except asyncio.CancelledError:
            if not self.stopped:
                raise
        finally:
            self._task = None
            self._events = None

    # -- subscriptions ----------------------------------------------------
    def _renew(self, endpoint: Endpoint) -> None:
        ttl = endpoint.time_to_live
        if ttl:
            self.endpoints_expire = True
            endpoint.deadline = self.clock() + ttl
            endpoint.expiry = datetime.now() + timedelta(seconds=ttl)
        else:
            endpoint.deadline = math.inf
            endpoint.expiry = None

    def _check_process_rule(self, endpoint: Endpoint) -> None:
        key = endpoint.id
        if not self.subscribers or (len(self.subscribers) == 1 and key in self.subscribers):
            return
        if self.is_process_channel:
            raise SubscriptionError(f"process channel {self.name!r} already has another endpoint")
        if endpoint.is_process_channel:
            raise SubscriptionError(f"channel {self.name!r} has other endpoints: cannot make it a process channel")

    def subscribe(self, endpoint: Endpoint) -> None:
        """Add (or renew) a subscriber. Multiple endpoints may be registered for
        normal channels, only one for a process channel. The endpoint goes to
        the end of the round robin and its expiry is renewed.

        Raises:
            SubscriptionError: Attempt to change or add multiple endpoints for a Process Channel
        """
        self._check_process_rule(endpoint)
        if endpoint.is_process_channel:
            self.is_process_channel = True
        self._renew(endpoint)
        key = endpoint.id
        if key in self.subscribers:
            del self.subscribers[key]
        self.subscribers[key] = endpoint
        self._set_subscribers_available()

    def grant(self, endpoint: Endpoint, credit: int) -> Endpoint:
        """Allow ``credit`` more deliveries to ``endpoint``, subscribing it
        first if need be (an endpoint already subscribed keeps its place in
        the round). Returns the endpoint as stored."""
        current = self.subscribers.get(endpoint.id)
        if current is None:
            self.subscribe(endpoint)
            endpoint.credit = credit
            current = endpoint
        else:
            self._renew(current)
            if current.credit is not None:
                current.credit = min(current.credit + credit, MAX_CREDIT)
        self._set_subscribers_available()
        return current  # type: ignore[no-any-return]

    def discard(self, endpoint: Endpoint) -> None:
        """Discards an endpoint from the queue.

        Raises:
            SubscriptionError: The endpoint is not subscribed.
        """
        try:
            del self.subscribers[endpoint.id]
        except KeyError:
            raise SubscriptionError(f"endpoint is not subscribed to {self.name!r}") from None
        self._set_subscribers_available()

    # -- messages ---------------------------------------------------------
    def push(self, message: DataMessage, time_to_live: Optional[float] = 60) -> None:
        """Pushes a message onto the tail of the queue; it expires after
        ``time_to_live`` seconds (``None`` or 0: never).

        Raises:
            QueueFull: The queue holds ``max_length`` messages.
        """
        if self.max_length is not None and len(self.queue) >= self.max_length:
            self.expire()
            if len(self.queue) >= self.max_length:
                raise QueueFull(self.name, self.max_length)
        message.deadline = deadline = self.clock() + time_to_live if time_to_live else math.inf
        if deadline < self.next_deadline:
            self.next_deadline = deadline
        self.queue.append(message)
        self.meter.used += message.size
        self._set_messages_available()

    def push_front(self, message: DataMessage) -> None:
        """Put a message back at the head (a delivery handed back unread).
        Keeps the message's deadline; ignores ``max_length``, since the
        message was counted when it first arrived."""
        if message.deadline < self.next_deadline:
            self.next_deadline = message.deadline
        self.queue.appendleft(message)
        self.meter.used += message.size
        self._set_messages_available()

    def put_back(self, messages: list[DataMessage]) -> None:
        """A run that could not be sent goes back to the head, in order."""
        self.next_deadline = min(self.next_deadline, min((m.deadline for m in messages), default=math.inf))
        self.queue.extendleft(reversed(messages))
        self.meter.used += sum(m.size for m in messages)
        self._set_messages_available()

    def clear(self) -> int:
        """Drop every queued message; returns how many."""
        count = len(self.queue)
        self.meter.used -= sum(m.size for m in self.queue)
        self.queue.clear()
        self.next_deadline = math.inf
        self._set_messages_available()
        return count

    def requeue(self, endpoint: Endpoint, messages: list[DataMessage], *, gone: bool) -> None:
        """A run taken for ``endpoint`` did not go: back to the head of the
        queue, in order, and no longer held. If the peer is ``gone`` its
        endpoint is dropped; else (busy) its credit comes back and the queue
        is ``stalled``, for the owner to retry. The one place of this rule."""
        self.put_back(messages)
        self.release(endpoint, len(messages))
        self.delivered -= len(messages)
        if gone:
            self.subscribers.pop(endpoint.id, None)
        else:
            if endpoint.credit is not None:
                endpoint.credit += len(messages)
            self.stalled = True
        self._set_subscribers_available()

    def _send(self, endpoint: Endpoint, messages: list[DataMessage], now: float) -> Optional[bool]:
        """Send ``messages`` to ``endpoint`` on its socket as one Deliver (one
        header, a body frame each), never blocking: the standalone path.
        Returns None if it went, else whether the peer is gone (else busy)."""
        import zmq

        header = encode(Deliver(self.name, [m.deadline - now for m in messages]))
        send = endpoint.socket.send
        try:
            # Frame by frame with plain int flags: pyzmq's send_multipart and
            # its IntFlag arithmetic cost more than the send itself. With
            # ROUTER_MANDATORY only the first frame can fail.
            for frame in endpoint.dealer:
                send(frame, _MORE_NOBLOCK)
            send(header, _MORE_NOBLOCK)
            last = len(messages) - 1
            for i, message in enumerate(messages):
                send(message.body, _NOBLOCK if i == last else _MORE_NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return True
            raise
        return None

    def hand_over(self) -> Optional[Endpoint]:
        """A message for this queue, while it is empty, goes straight to the
        next endpoint with credit, counted as ``deliver`` counts a run of
        one (the endpoint's credit and ``held``, the queue's ``held`` and
        ``delivered``); the caller sends it. None: no endpoint is ready,
        the message must be queued."""
        endpoint = self.subscribers.next_ready()
        if endpoint is not None:
            if endpoint.credit is not None:
                endpoint.credit -= 1
            endpoint.held += 1
            self.held += 1
            self.delivered += 1
        return endpoint

    def deliver(self, limit: Optional[int] = None, *, sink: Optional[Sink] = None) -> int:
        """Hand queued messages to endpoints with credit, round robin, until
        the queue is empty, no endpoint has credit, a peer is busy, or
        ``limit`` messages went. Never blocks. Returns how many went.

        Messages leave strictly in queue order. A run of consecutive
        messages for the same endpoint (one endpoint with credit, the usual
        case) travels as one Deliver of at most ``MAX_BATCH``. With a
        ``sink`` (the broker's ``Outbox``) each run is handed to
        ``sink.defer`` and counts as gone; the sink's owner sends it later
        and ``requeue``s what fails. Without one, each run is sent on the
        endpoint's socket at once; a run that fails is ``requeue``d and
        nothing after it is sent in this call: what went out is always a
        prefix of the queue, so no endpoint ever sees a message after a
        later one. An unreachable endpoint is dropped; a busy one sets
        ``stalled``."""
        self.stalled = False
        if not self.queue or not self.subscribers:
            return 0
        now = self.clock()
        queue = self.queue
        sent = 0
        run: list[DataMessage] = []
        run_to: Optional[Endpoint] = None  # endpoint of the run being built
        chosen: Optional[Endpoint] = None  # picked for the head message, not yet in a run
        while True:
            if queue and len(run) < MAX_BATCH and (limit is None or sent + len(run) < limit):
                if queue[0].deadline <= now:
                    self.meter.used -= queue.popleft().size
                    self.expired += 1
                    continue
                if chosen is None:
                    chosen = self.subscribers.next_ready()
                if chosen is not None and (run_to is None or chosen is run_to):
                    run_to, chosen = chosen, None
                    message = queue.popleft()
                    self.meter.used -= message.size
                    run.append(message)
                    if run_to.credit is not None:
                        run_to.credit -= 1
                    continue
            if run_to is None:
                break
            count = len(run)
            run_to.held += count
            self.held += count
            self.delivered += count
            if sink is not None:
                sink.defer(self, run_to, run)
                sent += len(run)
            else:
                gone = self._send(run_to, run, now)
                if gone is None:
                    sent += len(run)
                else:
                    self.requeue(run_to, run, gone=gone)
                    if not gone:
                        break
                    if chosen is run_to:
                        chosen = None
            run, run_to = [], None
        if chosen is not None:  # picked but not served: first in line next time
            self.subscribers._unget()
        self._set_messages_available()
        self._set_subscribers_available()
        return sent

    async def pull_and_send(self) -> None:
        """Pulls a message from the head of the queue and sends it to the next
        endpoint (round robin). If the endpoint is busy the message stays at
        the head and the queue waits ``penalty`` seconds before going on."""
        import asyncio

        if not self.deliver(limit=1) and self.stalled:
            await asyncio.sleep(self.penalty)
        elif not self.stalled:
            await asyncio.sleep(0)

    def expire(self, now: Optional[float] = None) -> int:
        """Drop the messages whose deadline has passed; returns how many."""
        if now is None:
            now = self.clock()
        if now < self.next_deadline:
            return 0
        queue = self.queue
        kept = deque(m for m in queue if m.deadline > now)
        self.next_deadline = min((m.deadline for m in kept), default=math.inf)
        dropped = len(queue) - len(kept)
        if not dropped:
            return 0
        self.expired += dropped
        self.meter.used -= sum(m.size for m in queue if m.deadline <= now)
        self.queue = kept
        self._set_messages_available()
        return dropped

    def expire_endpoints(self, now: Optional[float] = None) -> int:
        """Drop the endpoints whose deadline has passed; returns how many."""
        if not self.endpoints_expire:
            return 0
        if now is None:
            now = self.clock()
        gone = [k for k, e in self.subscribers.items() if e.deadline <= now]
        for key in gone:
            del self.subscribers[key]
        self._set_subscribers_available()
        return len(gone)

    def _flush_messages(self) -> None:
        """Flush expired messages from the queue (documented name of ``expire``)."""
        self.expire()

    def _flush_subscribers(self) -> None:
        """Flush expired subscribers from the queue (documented name of ``expire_endpoints``)."""
        self.expire_endpoints()
