"""The client's small pure parts: ``_requests.Requests`` (numbering, the
backlog, timeouts, with a fake send) and ``_handshake.Handshake`` (CURVE
refusals). No sockets."""

from __future__ import annotations

from django_message_broker.client._requests import Requests


def test_the_backlog_drains_in_order_first_ones_at_the_head():
    requests = Requests(max_backlog=10)
    numbers = [requests.number() for _ in range(3)]
    assert numbers == [1, 2, 3]
    requests.hold(1, [b"one"], None, None, 10.0, track=True, first=False)
    requests.hold(2, [b"two"], None, None, 10.0, track=False, first=False)
    requests.hold(3, [b"hello"], None, print, 10.0, track=True, first=True)
    wire: list[list] = []
    up = False

    def send(frames: list) -> bool:
        if up:
            wire.append(frames)
        return up

    requests.drain(send)
    assert wire == [] and list(requests.backlog) == [3, 1, 2]
    up = True
    requests.drain(send)
    assert wire == [[b"hello"], [b"one"], [b"two"]] and not requests.backlog
    assert 1 in requests and 3 in requests and 2 not in requests  # untracked: forgotten once sent
    assert requests.internal() == [3]


def test_overflow_drops_the_oldest_and_deadlines_expire():
    requests = Requests(max_backlog=2)
    assert requests.hold(1, [b"a"], None, None, 5.0, track=True, first=False) is None
    assert requests.hold(2, [b"b"], None, None, 6.0, track=True, first=False) is None
    assert requests.hold(3, [b"c"], None, None, 7.0, track=True, first=False) == 1
    requests.sent(4, None, None, 20.0)
    assert requests.expired(6.5) == [1, 2]
    assert requests.pop(1) is not None and requests.pop(1) is None
    assert len(requests.clear()) == 3 and not requests.backlog and 4 not in requests


def test_a_refusal_needs_two_vague_failures_and_ends_on_success():
    from django_message_broker.client._handshake import Handshake

    handshake = Handshake("tcp://x:1", curve=True)
    assert not handshake.failed("vague", 0.0, 5.0)  # one alone: a broker going away
    assert handshake.failed("vague", 0.1, 5.0) and handshake.error is not None
    assert not handshake.retry_due(1.0, 5.0) and handshake.retry_due(5.1, 5.0)
    assert handshake.succeeded() and handshake.error is None and not handshake.succeeded()
    assert handshake.failed("auth", 6.0, 5.0) and handshake.error.reason == "key not authorized"
    assert not Handshake("tcp://x:1", curve=False).failed("vague", 0.0, 5.0)


def test_a_loops_batch_settles_its_hand_offs_in_one_report():
    """``core._run_batch`` on a receive's loop: each future gets its outcome,
    a cancelled receive does not take its message, and the hub hears of
    the whole batch at once, in order (one lock per batch, not per message)."""
    import asyncio

    from django_message_broker.client._state import ChannelState
    from django_message_broker.client.core import _run_batch
    from django_message_broker.client.waiters import AsyncWaiter

    class Hub:
        def __init__(self) -> None:
            self.reports: list[list] = []

        def schedule(self, waiter: object, value: object, error: object) -> None:
            raise AssertionError("not used here")

        def settled(self, channel: object, item: object, accepted: bool) -> None:
            raise AssertionError("the batch is reported at once")

        def settled_all(self, outcomes: list) -> None:
            self.reports.append(outcomes)

    async def main() -> None:
        hub = Hub()
        a, b = ChannelState("a", 4), ChannelState("b", 4)
        took, cancelled, request = AsyncWaiter(hub, a), AsyncWaiter(hub, b), AsyncWaiter(hub)
        cancelled.future.cancel()
        error = ValueError("refused")
        failed = AsyncWaiter(hub, a)
        _run_batch(
            hub,  # type: ignore[arg-type]
            [
                (took, ("1", 9.0, None), None),
                (cancelled, ("2", 9.0, None), None),
                (request, 7, None),
                (failed, None, error),
            ],
        )
        assert hub.reports == [[(a, ("1", 9.0, None), True), (b, ("2", 9.0, None), False)]]
        assert took.future.result() == ("1", 9.0, None) and request.future.result() == 7
        assert failed.future.exception() is error

    asyncio.run(asyncio.wait_for(main(), 5))


def test_a_pipelined_group_sends_outcome_is_counted_once_and_an_error_logged(caplog):
    """``LoggingWaiter``: nobody waits for a pipelined group_send, so its
    failure is logged, and either way the window hears it is done. Closing
    the client is no failure (what was queued was sent)."""
    from django_message_broker.client.waiters import LoggingWaiter
    from django_message_broker.exceptions import BrokerUnavailable, ClientClosed

    done = []
    waiter = LoggingWaiter("group_send", lambda: done.append(1))
    with caplog.at_level("ERROR", logger="django_message_broker.client"):
        waiter.resolve([3, 0])
        waiter.resolve(None, ClientClosed("the client is closed"))
        assert not caplog.records
        waiter.resolve(None, BrokerUnavailable("tcp://127.0.0.1:1", 5))
    assert len(done) == 3
    [record] = caplog.records
    assert "a pipelined group_send failed" in record.getMessage()
