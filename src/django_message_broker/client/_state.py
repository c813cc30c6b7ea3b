"""The client's state, with no I/O: no threads, sockets, zmq, asyncio or clock.

How it works. ``ClientState`` holds what this process knows of the broker
conversation: the receive state of each channel (``ChannelState``), the
group memberships to replay after a restart, the flush epoch, the
consumption counts still to report, and the send window (``SendWindow``).
The driver (``client.core.Core``) owns the socket, the I/O thread and the
lock; it calls these methods with the lock held, passes the time in as
``now``, and sends the protocol messages they *return*: the state decides,
the driver does the I/O (httpcore's "decide under the lock, return the
I/O"). A test wires this state to the broker core in memory
(``tests/helpers.py`` ``BrokerPair``).

Rule 1: every rule about credit, buffering, hand-offs, consumption and the
send window lives here, in one place each.

Receiving uses credit (docs/protocol.md): a receive grants the broker
permission to deliver up to ``prefetch`` messages of a channel here
(``ChannelState.top_up``, the only place that computes credit).
Deliveries wait in the channel's buffer until a receive takes them. A
waiter that settles later (a receive on an event loop) gets one message at
a time (``handoffs``): the loop decides whether the receive still wants it,
and if not, the message goes back first in line (``settle``), so it is
never lost and never read twice. A message a receive returned counts
against its channel's capacity at the broker until a ``Consumed`` report
says so (``report``). A channel nobody asked for in ``idle_return``
seconds withdraws its credit (``idle``) and, once the broker confirms,
hands unread messages back (``withdrawn`` returns the ``Return``s).

Shared bodies. The driver says Hello with ``shared_bodies``, so a Deliver
may carry one body for several channels of this process (a group_send's
members here): ``share_bodies`` expands it to one message per channel, all
with the same ``bytes`` object and one ``Shared`` slot, where the first
receive to decode the body may leave the result for the others
(``messages.decode_shared``). Each channel still holds, counts, reports
and returns its own message: only the bytes and their decoding are shared.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Protocol, TypeVar

from .. import protocol as p

__all__ = [
    "MAX_GROUPS_AHEAD",
    "MAX_TRACKED_CHANNELS",
    "MAX_UNACKED",
    "ChannelState",
    "ClientState",
    "Item",
    "SendWindow",
    "Shared",
    "Waiter",
    "share_bodies",
]

#: Pipelined (unanswered) sends a process may have in flight before one waits.
MAX_UNACKED = 4096
#: Pipelined group_sends a process may have unanswered before one waits. Each
#: fans out to every member: a producer that runs further ahead only buries
#: the broker in input while the receivers fall behind.
MAX_GROUPS_AHEAD = 8
#: Channels whose depth the send window remembers; past it, it forgets them all.
MAX_TRACKED_CHANNELS = 10_000
_FULL = 1 << 62  # a channel's depth once a pipelined send to it was refused: ask next time

Outgoing = tuple[p.Command, Optional[list[bytes]]]  # a message for the driver to send, with its bodies


class Shared:
    """One body delivered to several channels of this process at once.
    ``value``: what a reader left for the others (``None``: nothing yet);
    the state never looks at it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None


#: A delivered message: (body, local deadline, the body's Shared slot if
#: other channels here got the same body in the same Deliver, else None).
Item = tuple[bytes, float, Optional[Shared]]


def share_bodies(frames: list[bytes], body_of: list[int]) -> tuple[list[bytes], list[Optional[Shared]]]:
    """A Deliver's ``body_of`` applied: message *i* gets ``frames[body_of[i]]``;
    a frame that several messages use gets one ``Shared`` slot for them all.
    Raises ``ValueError`` for an index out of range (a broken Deliver)."""
    if body_of and (min(body_of) < 0 or max(body_of) >= len(frames)):
        raise ValueError(f"body_of names frames outside 0..{len(frames) - 1}")
    uses = [0] * len(frames)
    for i in body_of:
        uses[i] += 1
    slots = [Shared() if n > 1 else None for n in uses]
    return [frames[i] for i in body_of], [slots[i] for i in body_of]


class Waiter(Protocol):
    """What the state needs of a waiting receive (see ``client.waiters``)."""

    #: True: ``resolve`` only starts a hand-off; the driver reports its
    #: outcome with ``ClientState.settle``. False: resolved means received.
    settles_later: bool

    def alive(self) -> bool: ...

    def resolve(self, value: Any = None, error: Optional[BaseException] = None) -> None: ...


W = TypeVar("W", bound=Waiter)


class ChannelState:
    """Receive state of one channel in this process (trio's
    ``MemoryChannelState``): its buffer, waiting receives, hand-offs,
    credit and consumption count."""

    __slots__ = (
        "buffer",
        "consumed",
        "credit",
        "handoffs",
        "last_wanted",
        "name",
        "prefetch",
        "waiters",
        "withdrawing",
    )

    def __init__(self, name: str, prefetch: int) -> None:
        self.name = name
        self.prefetch = prefetch
        self.buffer: deque[Item] = deque()
        self.waiters: deque[Waiter] = deque()
        self.credit = 0  # deliveries granted and not yet arrived
        self.last_wanted = 0.0
        self.withdrawing = False  # an Unsubscribe is on its way
        self.handoffs = 0  # messages on their way to a receive's event loop
        self.consumed = 0  # messages receives returned, not yet reported to the broker

    def take_nowait(self, now: float) -> Optional[Item]:
        """The next live buffered message, if no receive is ahead in line.
        Expired ones are dropped on the way. Either way the message has left
        the channel: it is counted in ``consumed``, so the broker stops
        holding it against the channel's capacity."""
        while self.buffer and not self.waiters and not self.handoffs:
            item = self.buffer.popleft()
            self.consumed += 1
            if item[1] > now:
                return item
        return None

    def top_up(self, connected: bool) -> Optional[p.Subscribe]:
        """The credit to grant, if any: up to ``prefetch`` deliveries owed or
        buffered, in batches of at least half the window (one Subscribe per
        prefetch/2 messages, not one per message) unless the receives
        waiting outnumber the deliveries already owed (then at once)."""
        want = self.prefetch - self.credit - len(self.buffer)
        if want <= 0 or self.withdrawing or not connected:
            return None
        if want * 2 < self.prefetch and len(self.waiters) <= self.credit:
            return None
        self.credit += want
        return p.Subscribe(0, self.name, want)

    def feed(self, now: float) -> None:
        """Hand buffered messages to live waiters. One hand-off to an event
        loop at a time: if that receive turns out to be cancelled, its
        message must still be first for the next one."""
        while self.buffer and self.waiters and not self.handoffs:
            waiter = self.waiters[0]
            if not waiter.alive():
                self.waiters.popleft()
                continue
            item = self.buffer.popleft()
            if item[1] <= now:
                self.consumed += 1  # expired here: it has left the channel too
                continue
            self.waiters.popleft()
            if waiter.settles_later:
                self.handoffs += 1
                waiter.resolve(item)
            else:  # a blocked thread: it has the message now
                waiter.resolve(item)
                self.consumed += 1

    def settle(self, item: Item, accepted: bool, now: float) -> None:
        """A hand-off's outcome: the receive took ``item``, or it was
        cancelled (or its loop is gone) and ``item`` is first in line again."""
        self.handoffs -= 1
        if accepted:
            self.consumed += 1
            # A receive returns now: its caller is as good as asking again
            # (its next receive may wait for a busy loop, longer than
            # ``idle_return``, and must find what is buffered still here).
            self.last_wanted = now
        else:
            self.buffer.appendleft(item)
        self.feed(now)

    def put_back(self, item: Item, now: float) -> None:
        """A message whose receive was cancelled after it was resolved."""
        self.buffer.appendleft(item)
        self.feed(now)

    def forget(self, waiter: Waiter) -> None:
        """A receive gave up (timed out, cancelled) before any message."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def fail(self, error: BaseException) -> None:
        while self.waiters:
            self.waiters.popleft().resolve(None, error)

    def deliver(self, item: Item) -> None:
        self.credit = max(0, self.credit - 1)
        self.buffer.append(item)

    def unused(self, now: float, idle: float) -> bool:
        """Nothing here, nothing owed, nobody asked for ``idle`` seconds."""
        busy = self.waiters or self.buffer or self.credit or self.withdrawing or self.handoffs or self.consumed
        return not busy and now - self.last_wanted >= idle


class SendWindow:
    """How far this process may pipeline sends (h2's ``WindowManager``).

    A send goes without waiting while its channel is known to be at most
    half full (the last depth the broker reported plus our own sends since)
    and fewer than ``MAX_UNACKED`` sends are unanswered in all. Near
    capacity, the sender waits for the broker's answer, so ``QueueFull`` is
    exact for a single sender. Any answer resets the unanswered count: the
    broker has read everything sent before it, so a producer never runs
    more than one window ahead.

    A group_send goes without waiting while fewer than ``MAX_GROUPS_AHEAD``
    are unanswered (its members over capacity are skipped, never refused).
    Each is answered or fails exactly once (``group_done``), so that count
    is exact."""

    __slots__ = ("depth", "groups", "unacked")

    def __init__(self) -> None:
        self.depth: dict[str, int] = {}  # channel -> messages the senders here believe are queued
        self.unacked = 0  # pipelined sends not yet known to have reached the broker (approximate)
        self.groups = 0  # pipelined group_sends not yet answered (exact)

    def may_pipeline(self, channel: str, capacity: int, connected: bool) -> bool:
        """True: send without waiting (counted now). False: ask the broker."""
        depth = self.depth.get(channel, 0)
        if connected and depth < capacity // 2 and self.unacked < MAX_UNACKED:
            self.depth[channel] = depth + 1
            self.unacked += 1
            return True
        return False

    def may_pipeline_group(self, connected: bool) -> bool:
        """A group_send: True to send without waiting (counted now; call
        ``group_done`` once it is answered or failed), False to wait for
        the broker's answer."""
        if connected and self.groups < MAX_GROUPS_AHEAD and self.unacked < MAX_UNACKED:
            self.groups += 1
            self.unacked += 1
            return True
        return False

    def group_done(self) -> None:
        """A pipelined group_send was answered, or failed."""
        self.groups -= 1

    def answered(self) -> None:
        """The broker answered a checked send or group_send: it has read
        everything sent before."""
        self.unacked = 0

    def acked(self, channel: str, depth: int) -> None:
        """The broker answered a checked send with the channel's depth."""
        self.answered()
        if len(self.depth) >= MAX_TRACKED_CHANNELS:
            self.depth.clear()
        self.depth[channel] = depth

    def refused(self, channel: str, capacity: int, full: bool) -> None:
        """A checked send failed. Full: the next sends must ask the broker
        too. Anything else: the depth is unknown."""
        if full:
            self.depth[channel] = capacity
        else:
            self.depth.pop(channel, None)

    def refused_pipelined(self, channel: str) -> None:
        """The broker refused a pipelined send (full, or out of memory): the
        next sends to ``channel`` wait for its answer (an exact QueueFull)."""
        self.depth[channel] = _FULL

    def reset(self, restarted: bool) -> None:
        """(Re)connected: nothing is in flight; a new broker holds nothing."""
        self.unacked = 0
        if restarted:
            self.depth.clear()

    def flushed(self, prefix: str = "") -> None:
        """Namespace ``prefix`` (``""``: everything) was flushed."""
        for channel in [channel for channel in self.depth if p.in_namespace(channel, prefix)]:
            del self.depth[channel]


class ClientState:
    """Everything the client knows, per process. Not thread-safe: the driver
    calls it with its lock held."""

    def __init__(self, *, prefetch: int, process_prefetch: int, idle_return: float) -> None:
        self.prefetch = max(1, prefetch)
        self.process_prefetch = max(1, process_prefetch)
        self.idle_return = idle_return
        self.channels: dict[str, ChannelState] = {}
        self.groups: dict[tuple[str, str], float] = {}  # memberships to replay -> local deadline
        self.epoch = 0  # the broker's flush epoch (see protocol.Consumed)
        self.report_due = False  # some channel's ``consumed`` count is waiting to go out
        self.window = SendWindow()

    def channel(self, name: str) -> ChannelState:
        state = self.channels.get(name)
        if state is None:
            prefetch = self.process_prefetch if "!" in name else self.prefetch
            state = self.channels[name] = ChannelState(name, prefetch)
        return state

    def _noted(self, state: ChannelState) -> None:
        if state.consumed:
            self.report_due = True

    # -- receives ----------------------------------------------------------
    def take(
        self, name: str, now: float, make_waiter: Callable[[ChannelState], W], connected: bool
    ) -> tuple[Optional[Item], Optional[W], Optional[p.Subscribe]]:
        """A receive: the next message if one is here, else a new waiter
        (``make_waiter(channel state)``) parked in line; and the credit to
        grant."""
        state = self.channel(name)
        state.last_wanted = now
        item = state.take_nowait(now)
        waiter = None
        if item is None:
            waiter = make_waiter(state)
            state.waiters.append(waiter)
        self._noted(state)  # what it took, or skipped as expired
        return item, waiter, state.top_up(connected)

    def fetch_ahead(self, name: str, now: float, connected: bool) -> Optional[p.Subscribe]:
        """Ask for ``name``'s messages ahead of its first receive: the credit
        a receive would grant. They wait here for a receive; if none comes
        within ``idle_return``, they go back (``idle``)."""
        state = self.channel(name)
        state.last_wanted = now
        return state.top_up(connected)

    def deliver(
        self,
        channels: list[str],
        bodies: list[bytes],
        ttls: list[float],
        now: float,
        shared: Optional[list[Optional[Shared]]] = None,
        connected: bool = True,
    ) -> list[p.Subscribe]:
        """A Deliver: message *i* (``bodies[i]``, ``shared[i]``: see
        ``share_bodies``) for ``channels[i]``. Returns the credit to grant:
        receives still waiting once the window's deliveries are spent (more
        receives wait than ``prefetch`` allows in one window) ask for the
        next window here, since no new receive may come to ask."""
        touched: dict[str, ChannelState] = {}
        slots = shared if shared is not None else [None] * len(bodies)
        for name, body, ttl, slot in zip(channels, bodies, ttls, slots, strict=True):
            state = touched.get(name)
            if state is None:
                state = touched[name] = self.channel(name)
            state.deliver((body, now + ttl, slot))
        grants = []
        for state in touched.values():
            state.feed(now)
            self._noted(state)
            if state.waiters:
                grant = state.top_up(connected)
                if grant is not None:
                    grants.append(grant)
        return grants

    def settle(
        self, state: ChannelState, item: Item, accepted: bool, now: float, connected: bool = True
    ) -> Optional[p.Subscribe]:
        """A hand-off's outcome, from the receive's event loop. Returns the
        credit to grant: the window's deliveries may have waited in the
        buffer behind this hand-off, so only now, with the buffer drained,
        may receives still waiting need the next window."""
        state = self.channel(state.name)  # the same one, unless it was refused meanwhile
        state.settle(item, accepted, now)
        self._noted(state)
        return state.top_up(connected) if state.waiters else None

    def put_back(self, name: str, item: Item, now: float, connected: bool = True) -> Optional[p.Subscribe]:
        """A message whose receive was cancelled after it was resolved: first
        in line again. Returns the credit to grant, as ``settle``."""
        state = self.channel(name)
        state.put_back(item, now)
        self._noted(state)
        return state.top_up(connected) if state.waiters else None

    def forget_waiter(self, name: str, waiter: Waiter) -> None:
        state = self.channels.get(name)
        if state is not None:
            state.forget(waiter)

    def refuse(self, name: str, error: BaseException) -> None:
        """The broker refused this process's receive (another process owns
        that process channel): fail the waiting receives."""
        state = self.channels.pop(name, None)
        if state is not None:
            state.fail(error)

    def fail_waiters(self, error: BaseException) -> None:
        for state in self.channels.values():
            state.fail(error)

    # -- consumption -------------------------------------------------------
    def report(self, connected: bool) -> Optional[p.Consumed]:
        """What receives took since the last report, to send before anything
        else; None if nothing (or no connection: then it stays due)."""
        self.report_due = False
        if not connected:
            self.report_due = True
            return None
        states = [state for state in self.channels.values() if state.consumed]
        if not states:
            return None
        counts = [state.consumed for state in states]
        for state in states:
            state.consumed = 0
        return p.Consumed(self.epoch, [s.name for s in states], counts)

    def report_failed(self, report: p.Consumed) -> None:
        """The report could not be sent: keep its counts for the next try."""
        for name, count in zip(report.channels, report.counts, strict=True):
            self.channel(name).consumed += count
        self.report_due = True

    # -- the broker's lifecycle ---------------------------------------------
    def flushed(self, epoch: int, prefix: str = "") -> None:
        """The broker dropped every queued message and group of namespace
        ``prefix`` (``""``: all): drop what was delivered here and not read,
        and what we knew of depths and groups, in that namespace. Unreported
        consumption there was about flushed messages: forget it too."""
        covered = p.in_namespace
        self.epoch = epoch
        for state in self.channels.values():
            if covered(state.name, prefix):
                state.buffer.clear()
                state.consumed = 0
        for key in [key for key in self.groups if covered(key[0], prefix)]:
            del self.groups[key]
        self.window.flushed(prefix)

    def connected(self, now: float, restarted: bool) -> list[p.Command]:
        """A broker answered our Hello. Outstanding credit is void: grant it
        again for channels with waiting receives. A new broker (``restarted``)
        holds nothing: forget depths and unreported consumption, and replay
        the group memberships that have not expired (``GroupAdd`` requests)."""
        self.window.reset(restarted)
        out: list[p.Command] = []
        for state in self.channels.values():
            state.credit = 0
            state.withdrawing = False
            if restarted:  # the new broker never counted what we hold
                state.consumed = 0
            if state.waiters:
                grant = state.top_up(True)
                if grant is not None:
                    out.append(grant)
        for (group, channel), deadline in list(self.groups.items()):
            if deadline <= now:
                del self.groups[(group, channel)]
            elif restarted:
                out.append(p.GroupAdd(0, group, channel, deadline - now))
        return out

    def remember_group(self, group: str, channel: str, deadline: float) -> None:
        """A membership this process added: replayed after a broker restart."""
        self.groups[(group, channel)] = deadline

    def forget_group(self, group: str, channel: str) -> None:
        self.groups.pop((group, channel), None)

    # -- idle withdrawal -----------------------------------------------------
    def idle(self, now: float) -> list[p.Unsubscribe]:
        """Channels nobody received from for ``idle_return`` seconds that
        hold credit or messages: withdraw their credit (the driver sends the
        ``Unsubscribe`` requests and calls ``withdrawn`` on the answer).
        Channels with nothing left at all are forgotten. A channel with a
        receive in progress (waiting, or its hand-off not yet settled on a
        loop that lags) is not idle."""
        out = []
        unused = []
        for state in self.channels.values():
            # A hand-off on its way to a receive's event loop is a receive
            # still in progress, however busy that loop is: not idle.
            if state.waiters or state.handoffs or state.withdrawing or now - state.last_wanted < self.idle_return:
                continue
            if state.credit or state.buffer:
                state.withdrawing = True
                out.append(p.Unsubscribe(0, state.name))
            elif state.unused(now, self.idle_return):
                unused.append(state.name)
            else:
                state.last_wanted = now  # a hand-off or a report pending; look again later
        for name in unused:
            del self.channels[name]
        return out

    def withdrawn(self, name: str, now: float, connected: bool) -> list[Outgoing]:
        """The broker confirmed an ``Unsubscribe``. Every delivery it sent
        before has arrived (one pipe, in order), so the buffer is complete:
        hand its live messages back (``Return``), unless a receive came in
        meanwhile, which is served and granted credit again."""
        state = self.channel(name)
        state.withdrawing = False
        state.credit = 0
        if state.waiters:
            state.feed(now)
            self._noted(state)
            grant = state.top_up(connected)
            return [] if grant is None else [(grant, None)]
        returned = [(item[0], item[1]) for item in state.buffer if item[1] > now]
        state.consumed += len(state.buffer) - len(returned)  # expired here: reported, not returned
        state.buffer.clear()
        self._noted(state)
        out: list[Outgoing] = []
        for start in range(0, len(returned), p.MAX_BATCH):
            chunk = returned[start : start + p.MAX_BATCH]
            out.append((p.Return(name, [d - now for _, d in chunk], self.epoch), [b for b, _ in chunk]))
        return out
