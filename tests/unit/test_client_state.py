"""The pure client state (``client._state``) against the broker core, in
memory (``helpers.BrokerPair``): credit, hand-offs and put-back, idle
withdrawal, consumption reports, flush epochs, restart replay and the send
window. No sockets, no threads, no sleeping."""

from __future__ import annotations

import pytest

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.client._state import MAX_TRACKED_CHANNELS, MAX_UNACKED, ChannelState, SendWindow
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
