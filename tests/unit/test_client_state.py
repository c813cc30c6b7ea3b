"""The pure client state (``client._state``) against the broker core, in
memory (``helpers.BrokerPair``): credit, hand-offs and put-back, idle
withdrawal, consumption reports, flush epochs, restart replay and the send
window. No sockets, no threads, no sleeping."""

from __future__ import annotations

import pytest

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.client._state import (
    MAX_GROUPS_AHEAD,
    MAX_TRACKED_CHANNELS,
    MAX_UNACKED,
    ChannelState,
    SendWindow,
)
from helpers import BrokerPair, Receive

A, B, C = b"client-a", b"client-b", b"client-c"


def subscribes(client: object) -> list[p.Subscribe]:
    return [m for m in client.sent if isinstance(m, p.Subscribe)]  # type: ignore[attr-defined]


@pytest.fixture
def pair() -> BrokerPair:
    return BrokerPair(A, B, C)  # prefetch 4, idle_return 1.0


# -- credit -------------------------------------------------------------------------
def test_a_waiting_receive_grants_a_window_of_credit_and_gets_the_next_send(pair):
    waiting = pair[B].receive("ch")
    assert isinstance(waiting, Receive) and not waiting.done
    assert subscribes(pair[B]) == [p.Subscribe(0, "ch", 4)]
    pair[A].send("ch", b"m1")
    assert waiting.body == b"m1"
    assert pair[B].state.channels["ch"].credit == 3


def test_credit_is_topped_up_in_batches_of_half_the_window(pair):
    pair[B].receive("ch")  # waits; grants 4
    for i in range(5):
        pair[A].send("ch", b"%d" % i)  # 0 to the receive, 1-3 buffered, 4 queued at the broker
    assert pair.broker.queued() == 1
    assert pair[B].receive("ch") == b"1"  # 2 buffered, credit 0: want 2 = half the window
    assert subscribes(pair[B])[-1] == p.Subscribe(0, "ch", 2)
    assert pair.broker.queued() == 0 and len(pair[B].state.channels["ch"].buffer) == 3
    grants = len(subscribes(pair[B]))
    assert pair[B].receive("ch") == b"2"  # want 1 < half: no Subscribe for one message
    assert len(subscribes(pair[B])) == grants


def test_a_waiting_receive_covered_by_credit_owed_grants_none(pair):
    """A receive that waits while deliveries are already owed to it (credit
    outstanding) asks for nothing more until half the window is used: a
    steady stream costs one Subscribe per prefetch/2 messages, not one per
    receive. Receives that outnumber the credit owed are granted at once."""
    waiting = pair[B].receive("ch")  # grants 4
    pair[A].send("ch", b"1")
    assert waiting.body == b"1"
    grants = len(subscribes(pair[B]))
    again = pair[B].receive("ch")  # waits; 3 owed cover it
    assert isinstance(again, Receive) and len(subscribes(pair[B])) == grants
    pair[A].send("ch", b"2")
    assert again.body == b"2"
    channel = pair[B].state.channels["ch"]
    pair[B].receive("ch")  # credit 2 = half the window: topped up
    assert subscribes(pair[B])[-1] == p.Subscribe(0, "ch", 2) and channel.credit == 4
    for i in range(3):
        pair[A].send("ch", b"%d" % i)
    assert not channel.waiters
    first = pair[B].receive("c2")  # grants 4
    pair[A].send("c2", b"x")
    assert first.body == b"x" and pair[B].state.channels["c2"].credit == 3
    grants = len(subscribes(pair[B]))
    waiting = [pair[B].receive("c2") for _ in range(3)]  # three waiting, three owed: nothing asked
    assert len(subscribes(pair[B])) == grants
    waiting.append(pair[B].receive("c2"))  # a fourth outnumbers them: granted at once
    assert subscribes(pair[B])[-1] == p.Subscribe(0, "c2", 1)
    for i in range(4):
        pair[A].send("c2", b"%d" % i)
    assert [w.body for w in waiting] == [b"0", b"1", b"2", b"3"]


def test_more_receives_than_the_window_all_get_a_message(pair):
    """Six receives wait on a channel whose window (prefetch) is four: once
    the four owed deliveries have come, the two still waiting ask for the
    next window themselves (no new receive may come to ask for them)."""
    waiting = [pair[B].receive("ch") for _ in range(6)]
    assert subscribes(pair[B]) == [p.Subscribe(0, "ch", 4)]
    for i in range(6):
        pair[A].send("ch", b"%d" % i)
    assert [w.body for w in waiting] == [b"%d" % i for i in range(6)]
    assert len(subscribes(pair[B])) > 1  # granted again from the deliveries, never past the window:
    assert pair.broker.clients[B].endpoints["ch"].credit + len(pair[B].state.channels["ch"].buffer) <= 4


def test_more_receives_than_the_window_on_event_loops_all_get_a_message(pair):
    """The same with receives on event loops (hand-offs settle later, one
    at a time): the window's deliveries arrive while the first hand-off is
    on its way, so they wait in the buffer and cover the credit. Once the
    settles have drained the buffer, receives still wait and nothing is
    owed: the settle asks for the next window (no delivery or receive is
    coming to ask)."""
    waiting = [pair[B].receive("ch", settles_later=True) for _ in range(6)]
    for i in range(6):
        pair[A].send("ch", b"%d" % i)
    for i in range(6):
        assert waiting[i].body == b"%d" % i
        pair[B].settle(waiting[i])
        pair.pump()
    assert pair.broker.queued() == 0 and not pair[B].state.channels["ch"].buffer


def test_expired_messages_are_skipped_on_take(pair):
    pair[B].receive("ch")
    pair[A].send("ch", b"first")
    pair[A].send("ch", b"short", ttl=1.0)
    pair[A].send("ch", b"long")
    pair.now += 2
    assert pair[B].receive("ch") == b"long"


# -- hand-offs, cancel, put-back ----------------------------------------------------
def test_a_cancelled_hand_off_puts_the_message_back_first_in_line(pair):
    first = pair[B].receive("ch", settles_later=True)
    pair[A].send("ch", b"m1")
    pair[A].send("ch", b"m2")
    assert first.body == b"m1"
    channel = pair[B].state.channels["ch"]
    assert channel.handoffs == 1 and channel.buffer[0][0] == b"m2"
    # While m1 is on its way to the loop, a new receive waits behind it.
    second = pair[B].receive("ch", settles_later=True)
    assert isinstance(second, Receive) and not second.done
    pair[B].settle(first, accepted=False)  # the first receive was cancelled
    assert second.body == b"m1" and channel.handoffs == 1
    pair[B].settle(second)
    assert channel.consumed == 1 and pair[B].receive("ch") == b"m2"


def test_a_receive_that_gives_up_is_forgotten(pair):
    waiting = pair[B].receive("ch")
    pair[B].state.forget_waiter("ch", waiting)
    pair[A].send("ch", b"m1")
    assert not waiting.done and pair[B].receive("ch") == b"m1"


def test_put_back_of_a_message_taken_as_the_receive_was_cancelled(pair):
    pair[B].receive("ch")
    pair[A].send("ch", b"m1")
    pair[A].send("ch", b"m2")
    pair[B].state.put_back("ch", (b"m1", pair.now + 60), pair.now)
    assert [pair[B].receive("ch"), pair[B].receive("ch")] == [b"m1", b"m2"]


def test_a_refused_process_channel_fails_its_receives(pair):
    waiting = pair[B].receive("ch")
    pair[B].state.refuse("ch", ex.SubscriptionError("owned elsewhere"))
    assert isinstance(waiting.error, ex.SubscriptionError) and "ch" not in pair[B].state.channels


# -- idle withdrawal ----------------------------------------------------------------
def test_an_idle_channel_withdraws_its_credit_and_returns_unread_messages(pair):
    pair[B].receive("ch")
    for i in range(4):
        pair[A].send("ch", b"%d" % i)  # 0 to the receive, 1-3 wait in B's buffer
    pair.tick(0.5)
    assert not any(isinstance(m, p.Unsubscribe) for m in pair[B].sent)  # not idle yet
    pair.tick(1.0)
    assert any(isinstance(m, p.Unsubscribe) for m in pair[B].sent)
    [returned] = [m for m in pair[B].sent if isinstance(m, p.Return)]
    assert returned.channel == "ch" and len(returned.ttls) == 3
    assert pair.broker.queued() == 3 and not pair[B].state.channels["ch"].buffer
    waiting = pair[C].receive("ch")
    assert waiting.body == b"1"  # back at the head, in order
    assert [pair[C].receive("ch"), pair[C].receive("ch")] == [b"2", b"3"]


def test_fetch_ahead_brings_messages_before_the_first_receive_and_idle_returns_them(pair):
    """A process channel fetched ahead (the layer's ``new_channel``) is
    granted a window at once: a group_send finds it ready, and the first
    receive takes a message already here. Unread, they go back after
    ``idle_return``, as for any receive that stopped."""
    for name in ("p!read", "p!unread"):
        pair[B].post(pair[B].state.fetch_ahead(name, pair.now, connected=True))
    assert subscribes(pair[B]) == [p.Subscribe(0, "p!read", 8), p.Subscribe(0, "p!unread", 8)]  # process_prefetch
    for name in ("p!read", "p!unread"):
        pair[A].send(name, b"early")
    assert pair.broker.queued() == 0
    assert pair[B].receive("p!read") == b"early"  # no waiting, no round trip
    assert pair[B].state.fetch_ahead("p!read", pair.now, connected=False) is None  # no connection: nothing
    pair.tick(1.5)
    [returned] = [m for m in pair[B].sent if isinstance(m, p.Return)]
    assert returned.channel == "p!unread" and pair.broker.queued() == 1


def test_a_channel_whose_hand_off_lags_is_not_idle(pair):
    """A receive's event loop that is slower than ``idle_return`` to settle
    its hand-off (a process with thousands of channels) still has a receive
    in progress: the messages behind it stay here, not handed back."""
    first = pair[B].receive("ch", settles_later=True)
    pair[A].send("ch", b"m1")
    pair[A].send("ch", b"m2")
    assert first.body == b"m1"
    pair.tick(2.0)  # the loop has not settled m1 for 2 s
    assert not [m for m in pair[B].sent if isinstance(m, (p.Unsubscribe, p.Return))]
    pair[B].settle(first)
    pair.tick(0.9)  # the receive returned 0.9 s ago; its caller's next one lags too
    assert not [m for m in pair[B].sent if isinstance(m, (p.Unsubscribe, p.Return))]
    assert pair[B].receive("ch") == b"m2"
    pair.tick(2.0)  # now nobody receives: idle
    assert any(isinstance(m, p.Unsubscribe) for m in pair[B].sent)


def test_a_receive_during_withdrawal_is_served_and_granted_again(pair):
    pair[B].receive("ch")
    pair[A].send("ch", b"0")
    pair.now += 2
    channel = pair[B].state.channels["ch"]
    assert pair[B].state.idle(pair.now) == [p.Unsubscribe(0, "ch")]
    assert channel.withdrawing
    waiting = pair[B].receive("ch")  # no credit granted while withdrawing
    assert subscribes(pair[B])[-1] == p.Subscribe(0, "ch", 4) and len(subscribes(pair[B])) == 1
    out = pair[B].state.withdrawn("ch", pair.now, True)
    assert out == [(p.Subscribe(0, "ch", 4), None)] and not waiting.done


def test_a_channel_with_nothing_left_is_forgotten(pair):
    assert pair[B].receive("ch") == pair[B].state.channels["ch"].waiters[0]
    pair[B].state.forget_waiter("ch", pair[B].state.channels["ch"].waiters[0])
    pair.tick(2)  # withdraws the unused credit
    assert not pair[B].state.channels["ch"].withdrawing
    pair.tick()  # (0.3.0 never forgot a channel: one state per name ever used)
    assert "ch" not in pair[B].state.channels
    pair[B].receive("ch")
    pair.tick(0.5)  # asked for again: kept
    assert "ch" in pair[B].state.channels


# -- consumption and capacity -------------------------------------------------------
def test_a_delivered_message_counts_against_capacity_until_reported(pair):
    pair[B].receive("ch")
    assert pair[A].send("ch", b"1", capacity=2) is None  # to B's waiting receive
    assert pair[A].send("ch", b"2", capacity=2) is None  # to B's buffer
    assert isinstance(pair[A].send("ch", b"3", capacity=2), ex.QueueFull)
    assert pair[B].receive("ch") == b"2"
    assert isinstance(pair[A].send("ch", b"3", capacity=2), ex.QueueFull)  # not reported yet
    pair.tick()
    [report] = [m for m in pair[B].sent if isinstance(m, p.Consumed)]
    assert report == p.Consumed(pair.broker.epoch, ["ch"], [2])
    assert pair[A].send("ch", b"3", capacity=2) is None


@pytest.mark.parametrize("how", ["take", "withdraw"])
def test_a_message_that_expires_in_the_buffer_stops_counting(pair, how):
    """Delivered, never received, expired here: it left the channel, so it
    must not count against capacity for ever (it is reported like a
    received one, whether a receive skips it or the idle withdrawal finds
    it; ``ChannelState.feed`` skips expired ones the same way)."""
    pair[B].receive("ch")
    pair[A].send("ch", b"0", capacity=3)  # to the waiting receive
    pair.tick()  # its report
    for i in range(3):
        assert pair[A].send("ch", b"short%d" % i, ttl=1.0, capacity=3) is None  # B's buffer
    assert isinstance(pair[A].send("ch", b"full", capacity=3), ex.QueueFull)
    pair.now += 2  # they expire in B's buffer
    if how == "take":
        assert isinstance(pair[B].receive("ch"), Receive)  # skips all three, then waits
    else:
        pair.tick(0.0)  # idle for 2 s: withdraws, and hands back nothing
        assert not [m for m in pair[B].sent if isinstance(m, p.Return)]
    pair.tick()
    for i in range(3):
        assert pair[A].send("ch", b"again%d" % i, capacity=3) is None
    assert isinstance(pair[A].send("ch", b"full", capacity=3), ex.QueueFull)


def test_a_report_without_a_connection_waits(pair):
    pair[B].receive("ch")
    pair[A].send("ch", b"1")
    state = pair[B].state
    assert state.report_due and state.report(connected=False) is None and state.report_due
    report = state.report(connected=True)
    assert report is not None and not state.report_due
    state.report_failed(report)  # the send failed after all
    assert state.report_due and state.report(connected=True) == report


# -- flush --------------------------------------------------------------------------
def test_flush_drops_buffers_consumption_depths_and_groups(pair):
    pair[B].receive("ch")
    for body in (b"1", b"2", b"3"):
        pair[A].send("ch", body, capacity=4)
    pair[B].state.remember_group("room", "ch", pair.now + 60)
    assert pair[A].state.window.depth
    pair[A].request(p.Flush(0))
    for client in (pair[A], pair[B]):
        assert client.state.epoch == pair.broker.epoch == 1
        assert not client.state.window.depth
    channel = pair[B].state.channels["ch"]
    assert not channel.buffer and channel.consumed == 0 and not pair[B].state.groups
    # A report or a Return of the old epoch would be ignored; after the flush
    # the channel is empty and its full capacity is free.
    for body in (b"4", b"5", b"6", b"7"):
        assert pair[A].send("ch", body, capacity=4) is None


def test_a_namespace_flush_drops_only_that_namespace(pair):
    for name in ("a.ch", "b.ch"):
        pair[B].receive(name)
        for body in (b"1", b"2"):
            pair[A].send(name, body, capacity=10)
        pair[B].state.remember_group(name[0] + ".room", name, pair.now + 60)
    pair[A].request(p.Flush(0, "a"))
    state = pair[B].state
    assert not state.channels["a.ch"].buffer and len(state.channels["b.ch"].buffer) == 1
    assert list(state.groups) == [("b.room", "b.ch")]
    assert list(pair[A].state.window.depth) == ["b.ch"]


def test_a_refused_pipelined_send_makes_the_next_one_checked():
    window = SendWindow()
    window.refused_pipelined("ch")
    assert not window.may_pipeline("ch", 1_000_000, connected=True)
    window.acked("ch", 3)
    assert window.may_pipeline("ch", 100, connected=True)


# -- restarts -----------------------------------------------------------------------
def test_a_restart_replays_credit_for_waiting_receives_and_live_groups(pair):
    waiting = pair[B].receive("ch")
    pair[B].request(p.GroupAdd(0, "room", "ch", 60.0))
    pair[B].state.remember_group("room", "ch", pair.now + 60)
    pair[B].state.remember_group("old", "ch", pair.now + 5)
    pair.now += 10  # "old" has expired
    pair[A].state.window.depth["ch"] = 7
    pair.restart_broker()
    assert pair[B].state.groups == {("room", "ch"): pytest.approx(pair.now + 50)}
    assert pair[A].state.window.depth == {} and pair[A].state.window.unacked == 0
    assert len(pair.broker.groups) == 1
    pair[A].request(p.GroupSend(0, "room", 60.0, 100, []), b"hello")
    assert waiting.body == b"hello"


def test_a_reconnection_to_the_same_broker_grants_credit_again(pair):
    waiting = pair[B].receive("ch")
    pair[B].connected = False
    pair[B].hello()  # the same instance: not a restart
    assert subscribes(pair[B])[-1] == p.Subscribe(0, "ch", 4)
    pair[A].send("ch", b"x")
    assert waiting.body == b"x"


# -- the send window ----------------------------------------------------------------
def test_sends_pipeline_below_half_capacity_then_wait_for_the_broker(pair):
    window = pair[A].state.window
    for i in range(5):
        pair[A].send("ch", b"%d" % i, capacity=10)
    sends = [m for m in pair[A].sent if isinstance(m, p.Send)]
    assert [m.checked for m in sends] == [False] * 5
    assert window.unacked == 5 and window.depth["ch"] == 5
    pair[A].send("ch", b"5", capacity=10)  # at half: checked, and the answer resets
    assert [m for m in pair[A].sent if isinstance(m, p.Send)][-1].checked
    assert window.unacked == 0 and window.depth["ch"] == 6


def test_a_refused_send_marks_the_channel_full_exactly(pair):
    window = pair[A].state.window
    results = [pair[A].send("ch", b"%d" % i, capacity=3) for i in range(4)]
    assert results[:3] == [None, None, None] and isinstance(results[3], ex.QueueFull)
    assert window.depth["ch"] == 3
    pair[B].receive("ch")  # takes one; reported at the next tick
    pair.tick()
    assert pair[A].send("ch", b"again", capacity=3) is None  # checked, passes
    assert window.depth["ch"] == 3


def test_the_window_caps_unanswered_sends_and_tracked_channels():
    window = SendWindow()
    window.unacked = MAX_UNACKED
    assert not window.may_pipeline("ch", 100, connected=True)
    window.acked("ch", 0)
    assert window.may_pipeline("ch", 100, connected=True)
    assert not window.may_pipeline("other", 100, connected=False)
    window.depth = {f"c{i}": 0 for i in range(MAX_TRACKED_CHANNELS)}
    window.acked("ch", 4)
    assert window.depth == {"ch": 4}
    window.refused("ch", 10, full=False)
    assert "ch" not in window.depth
    window.unacked = 9
    window.reset(restarted=False)
    assert window.unacked == 0


def test_group_sends_pipeline_until_enough_are_unanswered():
    window = SendWindow()
    for _ in range(MAX_GROUPS_AHEAD):
        assert window.may_pipeline_group(connected=True)
    assert not window.may_pipeline_group(connected=True)  # this one waits for the broker's answer
    window.answered()  # that answer says nothing of which group_sends were answered
    assert not window.may_pipeline_group(connected=True)
    window.group_done()  # one was
    assert window.may_pipeline_group(connected=True) and window.unacked == 1
    window.group_done()
    window.unacked = MAX_UNACKED
    assert not window.may_pipeline_group(connected=True)  # the sends' window counts too
    assert not SendWindow().may_pipeline_group(connected=False)


def test_channel_state_alone_top_up_rules():
    channel = ChannelState("ch", 8)
    assert channel.top_up(connected=False) is None
    assert channel.top_up(connected=True) == p.Subscribe(0, "ch", 8)  # nothing held: a full window
    assert channel.top_up(connected=True) is None  # all owed already
    channel.withdrawing = True
    channel.credit = 0
    assert channel.top_up(connected=True) is None


# -- layering -----------------------------------------------------------------------
def test_the_client_state_does_no_io():
    """``_state`` (and the protocol it speaks) import no threads, sockets,
    zmq, asyncio or clock: time comes in as ``now``."""
    import ast
    import importlib

    forbidden = {"asyncio", "selectors", "socket", "threading", "time", "zmq"}
    for name in ("django_message_broker.client._state", "django_message_broker.protocol"):
        module = importlib.import_module(name)
        assert module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as source:
            tree = ast.parse(source.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & forbidden, (name, names)


# -- shared bodies: a group_send reaches each process once ---------------------------
def group_of(pair: BrokerPair, group: str, members: list[str]) -> None:
    for channel in members:
        pair[A].request(p.GroupAdd(0, group, channel, 60.0))


def held(pair: BrokerPair, ident: bytes, channel: str) -> int:
    return pair.broker.clients[ident].endpoints[channel].held


def test_a_group_send_reaches_a_process_once_with_its_members(pair):
    group_of(pair, "room", ["m1", "m2", "m3", "m4"])
    waiting = [pair[B].receive(c) for c in ("m1", "m2", "m3")] + [pair[C].receive("m4")]
    pair[B].delivers.clear()
    pair[C].delivers.clear()
    pair[A].request(p.GroupSend(0, "room", 60.0, 100, []), b"hello")
    [(deliver, frames)] = pair[B].delivers
    assert frames == 1 and deliver.channels == ["m1", "m2", "m3"] and deliver.body_of == [0, 0, 0]
    [(alone, frames)] = pair[C].delivers  # one member there: the plain form
    assert frames == 1 and alone.channel == "m4" and alone.body_of == []
    assert [w.body for w in waiting] == [b"hello"] * 4
    items = [w.value for w in waiting[:3]]
    assert items[0][0] is items[1][0] is items[2][0]  # one bytes object...
    assert items[0][2] is not None and items[0][2] is items[1][2] is items[2][2]  # ...and one Shared slot
    assert waiting[3].value[2] is None  # nothing to share
    # Held, consumed and reported per member, as before.
    assert [held(pair, B, c) for c in ("m1", "m2", "m3")] == [1, 1, 1]
    assert pair.broker.counters["delivered"] == 4  # messages, not frames
    pair.tick()
    [report] = [m for m in pair[B].sent if isinstance(m, p.Consumed)]
    assert sorted(zip(report.channels, report.counts, strict=True)) == [("m1", 1), ("m2", 1), ("m3", 1)]
    assert [held(pair, B, c) for c in ("m1", "m2", "m3")] == [0, 0, 0]


def test_a_client_that_does_not_say_shared_bodies_gets_a_body_per_message():
    pair = BrokerPair(A, B, client_options={"shared_bodies": False})
    group_of(pair, "room", ["m1", "m2"])
    waiting = [pair[B].receive(c) for c in ("m1", "m2")]
    pair[B].delivers.clear()
    pair[A].request(p.GroupSend(0, "room", 60.0, 100, []), b"hello")
    [(deliver, frames)] = pair[B].delivers
    assert frames == 2 and deliver.body_of == [] and [w.body for w in waiting] == [b"hello"] * 2
    assert all(w.value[2] is None for w in waiting)


def test_a_full_member_is_skipped_and_an_idle_one_returns_its_copy(pair):
    members = ["m1", "m2", "m3"]
    group_of(pair, "room", members)
    for channel in members:
        pair[B].receive(channel)  # waits: credit 4 each
    pair[A].request(p.GroupSend(0, "room", 60.0, 2, []), b"g1")  # to the three waiting receives
    # m2's first message is not yet reported consumed: it holds 1, then 2.
    pair[A].request(p.GroupSend(0, "room", 60.0, 2, []), b"g2")
    assert [held(pair, B, c) for c in members] == [2, 2, 2]
    pair[B].delivers.clear()
    req = pair[A].request(p.GroupSend(0, "room", 60.0, 2, [("m2", 3)]), b"g3")  # m2 may hold 3
    assert pair[A].replies.pop(req).value == [1, 2]  # m1 and m3 are full: skipped
    [(deliver, frames)] = pair[B].delivers
    assert deliver.channel == "m2" and frames == 1
    pair.tick()  # reports the three g1s
    pair[B].delivers.clear()
    pair[A].request(p.GroupSend(0, "room", 60.0, 2, []), b"g4")  # m2 full (g2, g3); m1, m3 get it
    [(deliver, frames)] = pair[B].delivers
    assert deliver.channels == ["m1", "m3"] and deliver.body_of == [0, 0] and frames == 1
    assert [held(pair, B, c) for c in members] == [2, 2, 2]
    # m1 reads on; m2 and m3 fall idle and hand back what they hold unread.
    pair.now += 0.5
    assert [pair[B].receive("m1"), pair[B].receive("m1")] == [b"g2", b"g4"]
    pair.tick(0.6)
    returns = {m.channel: m for m in pair[B].sent if isinstance(m, p.Return)}
    assert sorted(returns) == ["m2", "m3"] and len(returns["m2"].ttls) == 2 and len(returns["m3"].ttls) == 2
    pair.tick()
    assert [held(pair, B, c) for c in ("m1",)] == [0]
    assert all(c not in pair.broker.clients[B].endpoints for c in ("m2", "m3"))  # nothing held, unsubscribed
    assert [len(pair.broker.queues[c].queue) for c in ("m2", "m3")] == [2, 2]
    waiting = pair[C].receive("m2")  # grants credit: back at the head, in order
    assert waiting.body == b"g2" and pair[C].receive("m2") == b"g3"
    assert pair[C].receive("m3").body == b"g2"


def test_a_busy_process_gets_its_shared_delivery_back_and_again(pair):
    members = ["m1", "m2", "m3"]
    group_of(pair, "room", members)
    waiting = [pair[B].receive(c) for c in members]
    pair.router.busy.add(B)
    pair[A].request(p.GroupSend(0, "room", 60.0, 100, []), b"hello")
    assert [len(pair.broker.queues[c].queue) for c in members] == [1, 1, 1]
    assert [held(pair, B, c) for c in members] == [0, 0, 0] and pair.broker.counters["delivered"] == 0
    pair.router.busy.clear()
    pair[B].delivers.clear()
    pair.broker.retry_stalled()
    pair.pump()
    [(deliver, frames)] = pair[B].delivers
    assert frames == 1 and deliver.body_of == [0, 0, 0]
    assert [w.body for w in waiting] == [b"hello"] * 3 and pair.broker.counters["delivered"] == 3


def test_members_in_two_namespaces_share_a_body_and_a_flush_drops_one_namespace(pair):
    members = ["a.m1", "a.m2", "b.m1", "b.m2"]
    group_of(pair, "room", members)
    for channel in members:
        pair[B].receive(channel)
    pair[A].request(p.GroupSend(0, "room", 60.0, 100, []), b"g1")  # to the waiting receives
    pair[B].delivers.clear()
    pair[A].request(p.GroupSend(0, "room", 60.0, 100, []), b"g2")  # into the four buffers
    [(deliver, frames)] = pair[B].delivers
    assert deliver.channels == members and deliver.body_of == [0, 0, 0, 0] and frames == 1
    # The g1s were taken but not yet reported when namespace "a" is flushed:
    # the late report counts for "b" only.
    report = pair[B].state.report(connected=True)
    pair[A].request(p.Flush(0, "a"))
    pair[B].post(report)
    state = pair[B].state
    assert not state.channels["a.m1"].buffer and not state.channels["a.m2"].buffer
    assert [held(pair, B, c) for c in members] == [0, 0, 1, 1]  # g2 in b.*, unread
    first, second = state.channels["b.m1"].buffer[0], state.channels["b.m2"].buffer[0]
    assert first[0] is second[0] and first[2] is second[2] is not None
    assert [pair[B].receive("b.m1"), pair[B].receive("b.m2")] == [b"g2", b"g2"]
    pair.tick()
    assert [held(pair, B, c) for c in members] == [0, 0, 0, 0]


def test_share_bodies_maps_frames_to_messages():
    from django_message_broker.client._state import share_bodies

    bodies, shared = share_bodies([b"x", b"y"], [0, 1, 0])
    assert bodies == [b"x", b"y", b"x"] and shared[0] is shared[2] is not None and shared[1] is None
    for bad in ([0, 2], [-1, 0]):
        with pytest.raises(ValueError):
            share_bodies([b"x", b"y"], bad)
