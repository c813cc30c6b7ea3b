"""Pure unit tests of ``server.tasks``, the broker's AMQP model for kombu:
no sockets, a fake clock, deliveries collected from the sink."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from django_message_broker import exceptions as ex
from django_message_broker._memory import MESSAGE_OVERHEAD
from django_message_broker.server.server_queue import MemoryMeter
from django_message_broker.server.tasks import (
    MAX_NAME,
    Delivery,
    Exchange,
    TaskMessage,
    TaskQueue,
    Tasks,
    topic_matches,
)
from helpers import FakeClock

A, B, C = b"conn-a", b"conn-b", b"conn-c"


class Rig:
    """A ``Tasks`` whose sink collects (ident, delivery) pairs, on a fake clock."""

    def __init__(self, *idents: bytes, vhost: str = "/", limit: Optional[int] = None) -> None:
        self.clock = FakeClock()
        self.meter = MemoryMeter(limit)
        self.out: list[tuple[bytes, Delivery]] = []
        self.tasks = Tasks(clock=self.clock, sink=lambda ident, d: self.out.append((ident, d)), meter=self.meter)
        for ident in idents:
            self.tasks.open(ident, vhost)

    def take(self, ident: Optional[bytes] = None) -> list[Delivery]:
        """Deliveries sent (to ``ident``) since the last take."""
        mine = [d for who, d in self.out if ident is None or who == ident]
        self.out = [(who, d) for who, d in self.out if ident is not None and who != ident]
        return mine

    def bodies(self, ident: Optional[bytes] = None) -> list[Any]:
        return [d.message.body for d in self.take(ident)]

    def queue(self, name: str, vhost: str = "/") -> TaskQueue:
        return self.tasks.vhosts[vhost].queues[name]

    def ready(self, name: str, vhost: str = "/") -> list[Any]:
        """The queue's ready bodies in the order they would be served."""
        return [m.body for level in reversed(self.queue(name, vhost).levels) for m in level]

    def declare(self, name: str, ident: bytes = A, **options: Any) -> None:
        self.tasks.declare_queue(ident, name, **options)

    def publish(self, key: str, *bodies: bytes, exchange: str = "", priority: int = 0, ttl: float = 0.0) -> int:
        return sum(self.tasks.publish(A, exchange, key, body, priority, ttl) for body in bodies)

    def ready_bytes(self) -> int:
        """What the meter should count: every ready message's size."""
        return sum(
            m.size for v in self.tasks.vhosts.values() for q in v.queues.values() for level in q.levels for m in level
        )


def size(body: bytes) -> int:
    return len(body) + MESSAGE_OVERHEAD


# -- routing ------------------------------------------------------------------------
def test_default_exchange_routes_to_the_queue_named_by_the_key():
    rig = Rig(A)
    rig.declare("q")
    assert rig.publish("q", b"x") == 1
    assert rig.ready("q") == [b"x"]
    assert rig.publish("nope", b"y") == 0  # no such queue: unroutable
    assert rig.tasks.unroutable == 1
    assert rig.tasks.stats()["task_unroutable"] == 1


def test_default_exchange_can_be_neither_declared_nor_bound():
    rig = Rig(A)
    rig.declare("q")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.declare_exchange(A, "", "direct")
    rig.tasks.declare_exchange(A, "", "direct", passive=True)  # it exists
    with pytest.raises(ex.NotFound):
        rig.tasks.bind(A, "q", "", "q")


def test_direct_exchange_routes_on_an_equal_key():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "dx", "direct")
    for name in ("q1", "q2", "q3"):
        rig.declare(name)
    rig.tasks.bind(A, "q1", "dx", "red")
    rig.tasks.bind(A, "q2", "dx", "red")
    rig.tasks.bind(A, "q3", "dx", "green")
    rig.tasks.bind(A, "q3", "dx", "red.*")  # no patterns in a direct exchange
    assert rig.publish("red", b"r", exchange="dx") == 2
    assert rig.publish("green", b"g", exchange="dx") == 1
    assert rig.publish("red.x", b"rx", exchange="dx") == 0
    assert rig.publish("red.*", b"star", exchange="dx") == 1
    assert (rig.ready("q1"), rig.ready("q2"), rig.ready("q3")) == ([b"r"], [b"r"], [b"g", b"star"])
    assert rig.tasks.unroutable == 1


def test_binding_twice_is_one_binding_and_unbind_stops_routing():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "dx", "direct")
    rig.declare("q")
    rig.tasks.bind(A, "q", "dx", "k")
    rig.tasks.bind(A, "q", "dx", "k")
    assert rig.publish("k", b"1", exchange="dx") == 1
    rig.tasks.unbind(A, "q", "dx", "k")
    rig.tasks.unbind(A, "q", "dx", "k")  # already gone: fine
    rig.tasks.unbind(A, "q", "no-such-exchange", "k")
    assert rig.publish("k", b"2", exchange="dx") == 0
    assert rig.ready("q") == [b"1"]


# AMQP topic matching: words are separated by dots, ``*`` is exactly one word
# and ``#`` zero or more. An empty word is a word ("a..b" has three).
TOPIC_CASES = [
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#", ".", True),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b.a", False),
    ("a.#", "ab", False),
    ("#.c", "c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.c.d", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.b.b.c", True),
    ("a.#.c", "a.b", False),
    ("a.#.c", "b.a.c", False),
    ("#.#.b", "b", True),
    ("#.#.b", "a.b", True),
    ("#.#.b", "a.a.a.b", True),
    ("#.#.b", "a.b.a", False),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.b", "a.b", True),
    ("*.b", "b", False),
    ("a.*", "a", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("#.*", "a", True),
    ("#.*", "a.b.c", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*.#.*", "a.b.c", True),
    ("a.b", "a.b", True),
    ("a.b", "a.b.c", False),
    ("a.b", "a", False),
    ("a..b", "a..b", True),
    ("a.*.b", "a..b", True),
    ("a.#.b", "a..b", True),
    ("a..b", "a.b", False),
    ("a.", "a.", True),
    ("a.", "a", False),
    ("a.*", "a.", True),
    (".a", ".a", True),
    ("*.a", ".a", True),
    ("*.*", ".", True),
    ("*", ".", False),
    ("*", "", False),  # "" is zero words (AMQP; RabbitMQ's split_topic_key)
    ("#.*", "", False),
    ("*.#", "", False),
    ("#.#.*", "", False),
    ("a.#", "", False),
    ("", "", True),
    ("", "a", False),
    ("a", "", False),
    ("a*", "ab", False),  # wildcards are whole words only
    ("a#", "a.b", False),
    ("a#", "a#", True),
]


@pytest.mark.parametrize(("pattern", "key", "matches"), TOPIC_CASES)
def test_topic_exchange_matches_as_amqp(pattern, key, matches):
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "tx", "topic")
    rig.declare("q")
    rig.tasks.bind(A, "q", "tx", pattern)
    assert rig.publish(key, b"m", exchange="tx") == int(matches)
    assert rig.tasks.unroutable == int(not matches)


def _reference_match(pattern: list[str], words: list[str]) -> bool:
    """AMQP topic matching by its definition (backtracking: small inputs only)."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_reference_match(rest, words[k:]) for k in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _reference_match(rest, words[1:])


def _split(key: str) -> list[str]:
    return key.split(".") if key else []  # "" is zero words


_topic_keys = st.lists(st.sampled_from(["a", "b", ""]), max_size=5).map(".".join)
_topic_patterns = st.lists(st.sampled_from(["a", "b", "", "*", "#"]), max_size=5).map(".".join)


@settings(max_examples=400, deadline=None)
@given(pattern=_topic_patterns, key=_topic_keys)
def test_topic_routing_agrees_with_the_definition(pattern, key):
    exchange = Exchange("tx", "topic")
    exchange.bind("q", pattern)
    assert exchange.route(key) == (["q"] if _reference_match(_split(pattern), _split(key)) else [])


@pytest.mark.timeout(10)
def test_topic_matching_takes_linear_time_whatever_the_pattern():
    # Backtracking over each # took exponential time: 10 "#." and 20 words, 20 s.
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "tx", "topic")
    rig.declare("q")
    rig.tasks.bind(A, "q", "tx", "#." * 60 + "b")
    rig.tasks.bind(A, "q", "tx", "#.a." * 30 + "#.c")
    many_a = ".".join(["a"] * 120)
    assert rig.publish(many_a, b"m", exchange="tx") == 0
    assert rig.publish(many_a + ".b", b"m", exchange="tx") == 1
    assert rig.publish(many_a + ".c", b"m", exchange="tx") == 1
    assert not topic_matches(("#",) * 100 + ("b",), ["a"] * 200)


def test_routing_keys_are_amqp_short_strings():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "tx", "topic")
    rig.declare("q")
    rig.tasks.bind(A, "q", "tx", "k" * MAX_NAME)
    with pytest.raises(ex.ProtocolError):
        rig.tasks.bind(A, "q", "tx", "k" * (MAX_NAME + 1))
    with pytest.raises(ex.ProtocolError):
        rig.tasks.publish(A, "tx", "a." * 200, b"m", 0, 0)
    with pytest.raises(ex.ProtocolError):
        rig.tasks.publish(A, "", None, b"m", 0, 0)
    assert rig.publish("k" * MAX_NAME, b"m", exchange="tx") == 1


def test_topic_exchange_delivers_once_per_queue_whatever_matches():
    rig = Rig(A, B)
    rig.tasks.declare_exchange(A, "tx", "topic")
    rig.declare("q1")
    rig.declare("q2", ident=B)
    for pattern in ("#", "a.*", "a.b", "*.b"):
        rig.tasks.bind(A, "q1", "tx", pattern)
    rig.tasks.bind(B, "q2", "tx", "#.b")
    rig.tasks.bind(B, "q2", "tx", "c")
    assert rig.publish("a.b", b"ab", exchange="tx") == 2
    assert rig.publish("c", b"c", exchange="tx") == 2
    assert rig.publish("z", b"z", exchange="tx") == 1
    assert rig.ready("q1") == [b"ab", b"c", b"z"]
    assert rig.ready("q2") == [b"ab", b"c"]


def test_fanout_reaches_every_bound_queue_of_every_connection_once():
    rig = Rig(A, B, C)
    rig.tasks.declare_exchange(A, "fx", "fanout")
    rig.tasks.declare_exchange(B, "fx", "fanout")  # the same exchange
    for ident, name in ((A, "qa"), (B, "qb"), (C, "qc")):
        rig.declare(name, ident=ident)
        rig.tasks.bind(ident, name, "fx", "ignored." + name)
    rig.tasks.bind(C, "qc", "fx", "another key")  # bound twice: still one copy
    rig.declare("unbound")
    assert rig.publish("any.key", b"all", exchange="fx") == 3
    assert [rig.ready(n) for n in ("qa", "qb", "qc", "unbound")] == [[b"all"], [b"all"], [b"all"], []]


def test_fanout_queues_are_consumed_by_their_own_connections():
    rig = Rig(A, B)
    rig.tasks.declare_exchange(A, "fx", "fanout")
    for ident, name in ((A, "qa"), (B, "qb")):
        rig.declare(name, ident=ident, exclusive=True)
        rig.tasks.bind(ident, name, "fx", "")
        rig.tasks.consume(ident, 1, name, "c")
    rig.publish("", b"broadcast", exchange="fx")
    assert rig.bodies(A) == [b"broadcast"] and rig.bodies(B) == [b"broadcast"]


def test_predeclared_exchanges_exist_per_vhost():
    rig = Rig(A)
    for name, kind in (("amq.direct", "direct"), ("amq.topic", "topic"), ("amq.fanout", "fanout")):
        rig.tasks.declare_exchange(A, name, kind, passive=True)
        rig.tasks.declare_exchange(A, name, kind)
    rig.declare("q")
    rig.tasks.bind(A, "q", "amq.topic", "x.#")
    assert rig.publish("x.y", b"m", exchange="amq.topic") == 1


def test_unroutable_counts_every_dropped_publish():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "dx", "direct")
    rig.tasks.declare_exchange(A, "tx", "topic")
    rig.tasks.declare_exchange(A, "fx", "fanout")
    assert rig.publish("k", b"1", exchange="dx") == 0  # no binding
    assert rig.publish("k", b"2", exchange="tx") == 0
    assert rig.publish("k", b"3", exchange="fx") == 0  # nothing bound
    assert rig.publish("k", b"4", exchange="missing") == 0  # no such exchange (kombu's virtual transport drops too)
    assert rig.publish("k", b"5") == 0  # default exchange, no queue "k"
    assert rig.tasks.unroutable == 5
    assert rig.meter.used == 0


def test_deleting_a_queue_removes_its_bindings():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "tx", "topic")
    rig.declare("q")
    rig.tasks.bind(A, "q", "tx", "#")
    rig.tasks.delete_queue(A, "q")
    rig.declare("q")  # a new queue of that name is not bound
    assert rig.publish("k", b"m", exchange="tx") == 0
    assert rig.tasks.vhosts["/"].exchanges["tx"].bindings == {}


def test_deleting_an_exchange_drops_its_bindings():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "dx", "direct")
    rig.declare("q")
    rig.tasks.bind(A, "q", "dx", "k")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.delete_exchange(A, "dx", if_unused=True)
    rig.tasks.delete_exchange(A, "dx")
    rig.tasks.delete_exchange(A, "dx")  # gone already: fine
    with pytest.raises(ex.NotFound):
        rig.tasks.declare_exchange(A, "dx", "direct", passive=True)
    rig.tasks.declare_exchange(A, "dx", "direct")
    assert rig.publish("k", b"m", exchange="dx") == 0
    rig.tasks.delete_exchange(A, "dx", if_unused=True)  # unused now


def test_vhosts_are_separate_namespaces():
    rig = Rig()
    rig.tasks.open(A, "/one")
    rig.tasks.open(B, "/two")
    rig.declare("q", ident=A)
    rig.declare("q", ident=B)
    rig.tasks.publish(A, "", "q", b"for one", 0, 0)
    assert rig.ready("q", "/one") == [b"for one"] and rig.ready("q", "/two") == []
    rig.tasks.declare_exchange(A, "fx", "fanout")
    with pytest.raises(ex.NotFound):
        rig.tasks.declare_exchange(B, "fx", "fanout", passive=True)
    assert rig.tasks.queue_stats("/two")[0]["ready"] == 0
    assert rig.tasks.queue_stats("/none") == []


# -- priorities ----------------------------------------------------------------------
def test_nine_first_and_fifo_within_a_level():
    rig = Rig(A)
    rig.declare("q")
    for body, priority in ((b"a0", 0), (b"b5", 5), (b"c9", 9), (b"d0", 0), (b"e5", 5), (b"f9", 9), (b"g1", 1)):
        rig.publish("q", body, priority=priority)
    assert rig.ready("q") == [b"c9", b"f9", b"b5", b"e5", b"g1", b"a0", b"d0"]
    got = [rig.tasks.get(A, 1, "q", no_ack=True) for _ in range(7)]
    assert [d.message.body for d in got if d] == [b"c9", b"f9", b"b5", b"e5", b"g1", b"a0", b"d0"]
    assert rig.tasks.get(A, 1, "q") is None


def test_prefetch_hides_a_higher_priority_message_behind_no_more_than_prefetch_others():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 2)
    rig.tasks.consume(A, 1, "q", "c")
    rig.publish("q", *[b"low%d" % i for i in range(5)])
    held = rig.take(A)
    assert [d.message.body for d in held] == [b"low0", b"low1"]
    rig.publish("q", b"urgent", priority=9)
    rig.tasks.ack(A, 1, [held[0].tag])
    assert rig.bodies(A) == [b"urgent"]  # ahead of the three low ones still ready


def test_priorities_out_of_range_are_clamped():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"low", priority=-7)
    rig.publish("q", b"mid", priority=4)
    rig.publish("q", b"high", priority=255)
    assert [m.priority for level in rig.queue("q").levels for m in level] == [0, 4, 9]
    assert rig.ready("q") == [b"high", b"mid", b"low"]
    for bad in (True, 1.5, "9", None):
        with pytest.raises(ex.ProtocolError):
            rig.tasks.publish(A, "", "q", b"x", bad, 0)
    assert len(rig.queue("q")) == 3


def test_requeued_messages_keep_their_priority_and_go_to_the_head_of_their_level():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"p5-1", b"p5-2", priority=5)
    rig.tasks.consume(A, 1, "q", "c")
    first, second = rig.take(A)
    rig.publish("q", b"p5-3", priority=5)  # nobody has room? prefetch 0: delivered at once
    [third] = rig.take(A)
    rig.publish("q", b"p9", priority=9)
    rig.publish("q", b"p1", priority=1)
    rig.take(A)
    rig.tasks.cancel(A, 1, "c")
    rig.tasks.get(A, 1, "q")  # p9 is out too (tracked): only p5s go back below
    rig.tasks.reject(A, 1, [second.tag, third.tag], requeue=True)
    assert rig.ready("q") == [b"p5-2", b"p5-3"]
    rig.tasks.reject(A, 1, [first.tag], requeue=True)
    assert rig.ready("q") == [b"p5-1", b"p5-2", b"p5-3"]
    assert all(m.priority == 5 and m.redelivered for m in rig.queue("q").levels[5])


def test_requeue_goes_ahead_of_newer_messages_of_its_level_but_not_of_higher_ones():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"old", priority=3)
    got = rig.tasks.get(A, 1, "q")
    assert got is not None
    rig.publish("q", b"new", priority=3)
    rig.publish("q", b"urgent", priority=8)
    rig.tasks.reject(A, 1, [got.tag], requeue=True)
    assert rig.ready("q") == [b"urgent", b"old", b"new"]


# -- prefetch ------------------------------------------------------------------------
def test_never_more_than_prefetch_unacked_per_session():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 2)
    rig.tasks.consume(A, 1, "q", "c1")
    rig.tasks.consume(A, 1, "q", "c2")  # two consumers share the session's limit
    rig.publish("q", *[b"%d" % i for i in range(6)])
    first = rig.take(A)
    assert [d.message.body for d in first] == [b"0", b"1"]
    assert len(rig.tasks.clients[A].sessions[1].unacked) == 2
    rig.tasks.ack(A, 1, [first[0].tag])
    assert rig.bodies(A) == [b"2"]
    rig.tasks.ack(A, 1, [first[1].tag])
    [d3] = rig.take(A)
    assert d3.message.body == b"3"
    rig.tasks.reject(A, 1, [d3.tag], requeue=False)
    assert rig.bodies(A) == [b"4"]
    assert rig.queue("q").ready == 1 and rig.queue("q").unacked == 2


def test_raising_prefetch_at_run_time_delivers_more_at_once():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 1)
    rig.tasks.consume(A, 1, "q", "c")
    rig.publish("q", *[b"%d" % i for i in range(10)])
    assert rig.bodies(A) == [b"0"]
    rig.tasks.qos(A, 1, 4)
    assert rig.bodies(A) == [b"1", b"2", b"3"]
    rig.tasks.qos(A, 1, 2)  # lower than what it holds: nothing more until below
    rig.tasks.ack(A, 1, [1, 2])
    assert rig.bodies(A) == []
    rig.tasks.ack(A, 1, [3])
    assert rig.bodies(A) == [b"4"]
    rig.tasks.qos(A, 1, 0)  # no limit
    assert rig.bodies(A) == [b"5", b"6", b"7", b"8", b"9"]
    assert list(rig.tasks.clients[A].sessions[1].unacked) == [4, 5, 6, 7, 8, 9, 10]


def test_prefetch_zero_is_unlimited():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "c")
    rig.publish("q", *[b"m"] * 500)
    assert len(rig.take(A)) == 500
    assert rig.queue("q").unacked == 500 and rig.queue("q").ready == 0


def test_prefetch_is_per_session():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 1)
    rig.tasks.qos(A, 2, 1)
    rig.tasks.consume(A, 1, "q", "c")
    rig.tasks.consume(A, 2, "q", "c")  # the same tag in another session is another consumer
    rig.publish("q", b"1", b"2", b"3")
    got = rig.take(A)
    assert [(d.session.id, d.tag, d.consumer, d.message.body) for d in got] == [(1, 1, "c", b"1"), (2, 1, "c", b"2")]
    rig.tasks.ack(A, 2, [1])
    assert [(d.session.id, d.tag) for d in rig.take(A)] == [(2, 2)]


def test_no_ack_consumers_bypass_prefetch():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 1)
    rig.tasks.consume(A, 1, "q", "auto", no_ack=True)
    rig.publish("q", b"1", b"2", b"3")
    got = rig.take(A)
    assert [d.message.body for d in got] == [b"1", b"2", b"3"]
    assert not any(d.tracked for d in got)
    assert rig.tasks.clients[A].sessions[1].unacked == {}
    assert rig.queue("q").unacked == 0 and rig.queue("q").delivered == 3
    assert rig.meter.used == 0


def test_basic_get_ignores_prefetch_but_is_tracked():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 1)
    rig.publish("q", b"1", b"2")
    one, two = rig.tasks.get(A, 1, "q"), rig.tasks.get(A, 1, "q")
    assert one is not None and two is not None
    assert (one.tag, one.consumer, one.tracked, two.tag) == (1, "", True, 2)
    assert rig.queue("q").unacked == 2
    rig.tasks.recover(A, 1)
    assert rig.ready("q") == [b"1", b"2"]


@pytest.mark.parametrize("bad", [-1, 1 << 21, True, 1.0, "3"])
def test_invalid_prefetch_is_refused(bad):
    rig = Rig(A)
    with pytest.raises(ex.ProtocolError):
        rig.tasks.qos(A, 1, bad)


# -- round robin ----------------------------------------------------------------------
def test_round_robin_across_connections():
    rig = Rig(A, B, C)
    rig.declare("q")
    for ident in (A, B, C):
        rig.tasks.consume(ident, 1, "q", "c")
    rig.publish("q", *[b"%d" % i for i in range(9)])
    got = [(bytes(ident), d.message.body) for ident, d in rig.out]
    assert got == [(A, b"0"), (B, b"1"), (C, b"2"), (A, b"3"), (B, b"4"), (C, b"5"), (A, b"6"), (B, b"7"), (C, b"8")]


def test_round_robin_across_sessions_and_consumers_of_one_connection():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "x")
    rig.tasks.consume(A, 1, "q", "y")
    rig.tasks.consume(A, 2, "q", "z")
    rig.publish("q", *[b"%d" % i for i in range(6)])
    assert [(d.session.id, d.consumer) for d in rig.take(A)] == [(1, "x"), (1, "y"), (2, "z")] * 2


@pytest.mark.parametrize("leaving", [A, B, C])
def test_a_consumer_leaving_does_not_make_another_lose_its_turn(leaving):
    rig = Rig(A, B, C)
    rig.declare("q")
    for ident in (A, B, C):
        rig.tasks.consume(ident, 1, "q", "c")
    rig.publish("q", b"1", b"2")  # to A and B: C is next
    rig.out.clear()
    rig.tasks.cancel(leaving, 1, "c")
    rig.publish("q", b"3", b"4", b"5")
    expected = {A: [C, B, C], B: [C, A, C], C: [A, B, A]}[leaving]  # C left: A is next
    assert [bytes(ident) for ident, _ in rig.out] == expected


def test_a_full_consumer_is_skipped_and_takes_its_turn_again_when_it_has_room():
    rig = Rig(A, B)
    rig.declare("q")
    rig.tasks.qos(A, 1, 1)
    rig.tasks.consume(A, 1, "q", "c")
    rig.tasks.consume(B, 1, "q", "c")
    rig.publish("q", *[b"%d" % i for i in range(4)])
    assert [(bytes(i), d.message.body) for i, d in rig.out] == [(A, b"0"), (B, b"1"), (B, b"2"), (B, b"3")]
    rig.out.clear()
    rig.tasks.ack(A, 1, [1])
    rig.publish("q", b"4", b"5")
    assert [(bytes(i), d.message.body) for i, d in rig.out] == [(A, b"4"), (B, b"5")]


def test_each_message_goes_to_one_consumer_only():
    rig = Rig(A, B)
    rig.declare("q")
    rig.tasks.qos(A, 1, 3)
    rig.tasks.qos(B, 1, 2)
    rig.tasks.consume(A, 1, "q", "c")
    rig.tasks.consume(B, 1, "q", "c")
    rig.publish("q", *[b"%d" % i for i in range(20)])
    seen: list[bytes] = []
    for _ in range(20):
        batch = list(rig.out)
        rig.out.clear()
        for ident, delivery in batch:
            seen.append(delivery.message.body)
            rig.tasks.ack(ident, 1, [delivery.tag])
        if not batch:
            break
    assert sorted(seen, key=int) == [b"%d" % i for i in range(20)]
    assert rig.queue("q").acked == 20 and rig.queue("q").unacked == 0


# -- ack, reject, recover ------------------------------------------------------------
def consumed(rig: Rig, *bodies: bytes, prefetch: int = 0, session: int = 1, ident: bytes = A) -> list[Delivery]:
    """Declare ``q``, consume it in ``session``, publish ``bodies``: the deliveries."""
    rig.declare("q", ident=ident)
    rig.tasks.qos(ident, session, prefetch)
    rig.tasks.consume(ident, session, "q", "c")
    rig.publish("q", *bodies)
    return rig.take(ident)


def test_ack_forgets_and_unknown_or_repeated_tags_are_ignored():
    rig = Rig(A)
    d1, d2 = consumed(rig, b"1", b"2")
    rig.tasks.ack(A, 1, [d1.tag])
    rig.tasks.ack(A, 1, [d1.tag, 99])
    rig.tasks.ack(A, 7, [d2.tag])  # another session's tag 2 is not this one
    queue = rig.queue("q")
    assert (queue.acked, queue.unacked) == (1, 1)
    assert list(rig.tasks.clients[A].sessions[1].unacked) == [d2.tag]


def test_ack_multiple_covers_every_tag_up_to_the_one_given_in_its_session_only():
    rig = Rig(A)
    deliveries = consumed(rig, *[b"%d" % i for i in range(5)])
    rig.tasks.qos(A, 2, 0)
    rig.tasks.consume(A, 2, "q", "other")
    rig.publish("q", b"s2")
    [other] = rig.take(A)
    assert (other.session.id, other.tag) == (2, 1)
    rig.tasks.ack(A, 1, [deliveries[2].tag], multiple=True)
    assert list(rig.tasks.clients[A].sessions[1].unacked) == [4, 5]
    assert list(rig.tasks.clients[A].sessions[2].unacked) == [1]
    assert rig.queue("q").acked == 3


def test_multiple_with_tag_zero_settles_every_outstanding_delivery_as_amqp():
    rig = Rig(A)
    consumed(rig, b"1", b"2", b"3")
    rig.tasks.ack(A, 1, [0])  # alone, tag 0 is no delivery
    rig.tasks.ack(A, 1, [], multiple=True)  # and no tag at all is nothing
    assert rig.queue("q").unacked == 3
    rig.tasks.reject(A, 1, [0], requeue=True, multiple=True)
    assert rig.queue("q").unacked == 3  # all back, and at once delivered again
    assert [d.message.redelivered for d in rig.take(A)] == [True] * 3
    rig.tasks.ack(A, 1, [0], multiple=True)
    assert rig.queue("q").unacked == 0 and rig.queue("q").acked == 3


def test_reject_requeue_puts_it_back_first_and_marked_redelivered():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"1", b"2", b"3")
    got = rig.tasks.get(A, 1, "q")
    assert got is not None and not got.message.redelivered
    rig.tasks.reject(A, 1, [got.tag], requeue=True)
    assert rig.ready("q") == [b"1", b"2", b"3"]
    again = rig.tasks.get(A, 1, "q")
    assert again is not None and again.message.body == b"1" and again.message.redelivered
    assert again.tag == 2  # a new delivery, a new tag
    assert rig.queue("q").redelivered == 1


def test_reject_without_requeue_drops():
    rig = Rig(A)
    _d1, d2, d3 = consumed(rig, b"1", b"2", b"3")
    rig.tasks.reject(A, 1, [d2.tag], requeue=False)
    assert rig.ready("q") == [] and rig.queue("q").unacked == 2
    rig.tasks.reject(A, 1, [d3.tag], requeue=False, multiple=True)  # 1 and 3
    assert rig.queue("q").unacked == 0 and rig.meter.used == 0
    assert rig.queue("q").acked == 0


def test_reject_multiple_requeues_in_order():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", *[b"%d" % i for i in range(4)])
    for _ in range(3):
        rig.tasks.get(A, 1, "q")
    rig.tasks.reject(A, 1, [2], requeue=True, multiple=True)
    assert rig.ready("q") == [b"0", b"1", b"3"]
    assert list(rig.tasks.clients[A].sessions[1].unacked) == [3]


def test_recover_gives_back_every_unacked_message_in_order():
    rig = Rig(A, B)
    deliveries = consumed(rig, *[b"%d" % i for i in range(5)], prefetch=5)
    rig.tasks.ack(A, 1, [deliveries[1].tag])
    rig.tasks.cancel(A, 1, "c")  # cancelling keeps the unacked messages with the session
    assert rig.queue("q").unacked == 4
    rig.tasks.recover(A, 1)
    assert rig.ready("q") == [b"0", b"2", b"3", b"4"]
    assert all(m.redelivered for m in rig.queue("q").levels[0])
    rig.tasks.consume(B, 1, "q", "c")
    assert [(d.message.body, d.message.redelivered) for d in rig.take(B)] == [
        (b"0", True),
        (b"2", True),
        (b"3", True),
        (b"4", True),
    ]


@pytest.mark.parametrize("tags", [[1.0], ["1"], [None], [True]])
def test_delivery_tags_must_be_integers(tags):
    rig = Rig(A)
    consumed(rig, b"1")
    with pytest.raises(ex.ProtocolError):
        rig.tasks.ack(A, 1, tags)
    with pytest.raises(ex.ProtocolError):
        rig.tasks.reject(A, 1, tags, requeue=True)
    assert rig.queue("q").unacked == 1


# -- close_session and drop_client ------------------------------------------------------
def test_close_session_gives_back_unacked_in_original_order_redelivered():
    rig = Rig(A, B)
    deliveries = consumed(rig, *[b"%d" % i for i in range(4)], prefetch=4)
    rig.publish("q", b"4", b"5")  # ready behind them
    rig.tasks.ack(A, 1, [deliveries[2].tag])  # room for "4"
    rig.tasks.qos(A, 2, 0)
    rig.tasks.consume(A, 2, "q", "other")  # the same connection's other session: "5"
    assert [(d.session.id, d.message.body) for d in rig.take(A)] == [(1, b"4"), (2, b"5")]
    rig.tasks.close_session(A, 1)
    assert 1 not in rig.tasks.clients[A].sessions
    # Given back to the head and at once delivered to session 2, in order.
    got = rig.take(A)
    assert [(d.session.id, d.message.body, d.message.redelivered) for d in got] == [
        (2, b"0", True),
        (2, b"1", True),
        (2, b"3", True),
        (2, b"4", True),
    ]
    rig.tasks.close_session(A, 1)  # closed already: fine
    rig.tasks.close_session(C, 1)  # unknown connection: fine


def test_close_session_ends_its_consumers():
    rig = Rig(A)
    consumed(rig, b"1")
    rig.tasks.close_session(A, 1)
    assert rig.queue("q").consumers == [] and rig.ready("q") == [b"1"]
    rig.publish("q", b"2")
    assert rig.take() == []
    rig.tasks.consume(A, 1, "q", "c")  # the channel number may be used again: tags start afresh
    assert [d.tag for d in rig.take(A)] == [1, 2]


def test_drop_client_gives_back_in_original_order_and_others_get_them():
    rig = Rig(A, B)
    consumed(rig, *[b"%d" % i for i in range(3)], prefetch=10)
    rig.publish("q", b"3")
    rig.take(A)
    rig.declare("q2", ident=A)
    rig.tasks.get(A, 2, "q2")  # nothing there
    assert rig.tasks.drop_client(A) == 4
    assert A not in rig.tasks.clients
    assert rig.ready("q") == [b"0", b"1", b"2", b"3"]
    assert [m.redelivered for m in rig.queue("q").levels[0]] == [True] * 4
    assert rig.queue("q").consumers == [] and rig.queue("q").unacked == 0
    rig.tasks.consume(B, 1, "q", "c")
    assert rig.bodies(B) == [b"0", b"1", b"2", b"3"]
    assert rig.tasks.drop_client(A) == 0  # gone already


def test_drop_client_gives_back_from_all_its_sessions_in_delivery_order_and_nothing_to_itself():
    rig = Rig(A, B)
    rig.declare("q")
    rig.tasks.qos(A, 1, 0)
    rig.tasks.qos(A, 2, 0)
    rig.tasks.consume(A, 1, "q", "c")
    rig.tasks.consume(A, 2, "q", "c")
    rig.publish("q", *[b"%d" % i for i in range(6)])
    assert [(d.session.id, d.message.body) for d in rig.take(A)] == [
        (1, b"0"),
        (2, b"1"),
        (1, b"2"),
        (2, b"3"),
        (1, b"4"),
        (2, b"5"),
    ]
    assert rig.tasks.drop_client(A) == 6
    assert rig.take() == []  # session 2 of the dying connection got none of session 1's messages
    assert rig.ready("q") == [b"%d" % i for i in range(6)]
    assert [m.redelivered for m in rig.queue("q").levels[0]] == [True] * 6
    assert (rig.queue("q").delivered, rig.queue("q").redelivered, rig.queue("q").unacked) == (6, 6, 0)
    rig.tasks.consume(B, 1, "q", "c")
    assert rig.bodies(B) == [b"%d" % i for i in range(6)]


def test_reopening_gives_back_from_all_sessions_without_delivering_to_the_old_ones():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.qos(A, 1, 1)
    rig.tasks.consume(A, 1, "q", "c")
    rig.tasks.consume(A, 2, "q", "c")  # no limit: it would take everything given back
    rig.publish("q", b"1", b"2")
    rig.take(A)
    rig.tasks.open(A, "/")
    assert rig.take() == []
    assert rig.ready("q") == [b"1", b"2"]


def test_drop_client_removes_its_exclusive_queues_and_their_bindings():
    rig = Rig(A, B)
    rig.tasks.declare_exchange(A, "fx", "fanout")
    rig.declare("mine", exclusive=True)
    rig.tasks.bind(A, "mine", "fx", "")
    rig.publish("", b"m", exchange="fx")
    rig.declare("shared")
    rig.tasks.drop_client(A)
    assert "mine" not in rig.tasks.vhosts["/"].queues and "shared" in rig.tasks.vhosts["/"].queues
    assert rig.tasks.vhosts["/"].exchanges["fx"].bindings == {}
    assert rig.meter.used == 0
    rig.declare("mine", ident=B)  # the name is free again


def test_drop_client_removes_auto_delete_queues_whose_last_consumer_went():
    rig = Rig(A, B)
    rig.declare("solo", auto_delete=True)
    rig.declare("shared", auto_delete=True)
    rig.declare("never-consumed", auto_delete=True)
    rig.tasks.consume(A, 1, "solo", "c")
    rig.tasks.consume(A, 1, "shared", "c1")
    rig.tasks.consume(B, 1, "shared", "c2")
    rig.publish("solo", b"x")
    [held] = rig.take(A)
    assert held.message.body == b"x"
    rig.tasks.drop_client(A)
    queues = rig.tasks.vhosts["/"].queues
    assert "solo" not in queues  # its held message went with it
    assert "shared" in queues  # B still consumes
    assert "never-consumed" in queues  # AMQP: only after a consumer has come and gone
    assert rig.meter.used == 0
    rig.tasks.cancel(B, 1, "c2")
    assert "shared" not in queues


def test_auto_delete_queue_goes_when_its_last_consumer_cancels():
    rig = Rig(A)
    rig.declare("q", auto_delete=True)
    rig.tasks.consume(A, 1, "q", "c1")
    rig.tasks.consume(A, 2, "q", "c2")
    rig.tasks.cancel(A, 1, "c1")
    assert "q" in rig.tasks.vhosts["/"].queues
    rig.tasks.cancel(A, 2, "c2")
    rig.tasks.cancel(A, 2, "c2")  # twice: fine
    rig.tasks.cancel(A, 9, "nope")
    assert "q" not in rig.tasks.vhosts["/"].queues


def test_open_again_starts_the_connection_afresh():
    rig = Rig(A)
    consumed(rig, b"1", b"2")
    rig.tasks.open(A, "/")  # a reconnecting connection
    assert rig.tasks.clients[A].sessions == {}
    assert rig.ready("q") == [b"1", b"2"] and rig.queue("q").consumers == []
    assert not rig.tasks.holds(A)


def test_holds_means_consumers_or_unacked_messages():
    rig = Rig(A, B)
    rig.declare("q")
    assert not rig.tasks.holds(A) and not rig.tasks.holds(C)
    rig.tasks.qos(A, 1, 5)  # a session alone holds nothing
    assert not rig.tasks.holds(A)
    rig.tasks.consume(A, 1, "q", "c")
    assert rig.tasks.holds(A)
    rig.publish("q", b"1")
    rig.tasks.cancel(A, 1, "c")
    assert rig.tasks.holds(A)  # still holds the message
    rig.tasks.ack(A, 1, [1])
    assert not rig.tasks.holds(A)
    rig.publish("q", b"2")
    rig.tasks.get(B, 1, "q")
    assert rig.tasks.holds(B)


# -- x-expires -----------------------------------------------------------------------
def test_an_unused_queue_expires_after_x_expires():
    rig = Rig(A)
    rig.declare("q", arguments={"x-expires": 10_000})
    rig.publish("q", b"m")  # publishing does not count as use (as RabbitMQ)
    rig.clock.advance(9.9)
    rig.tasks.sweep(rig.clock())
    assert "q" in rig.tasks.vhosts["/"].queues
    rig.clock.advance(0.1)
    rig.tasks.sweep(rig.clock())
    assert "q" not in rig.tasks.vhosts["/"].queues
    assert rig.meter.used == 0


def test_use_restarts_the_x_expires_timer():
    rig = Rig(A)
    rig.declare("q", arguments={"x-expires": 10_000})
    for use in (
        lambda: rig.declare("q"),
        lambda: rig.declare("q", passive=True),
        lambda: rig.tasks.get(A, 1, "q"),
    ):
        rig.clock.advance(9)
        use()
        rig.clock.advance(9)
        rig.tasks.sweep(rig.clock())
        assert "q" in rig.tasks.vhosts["/"].queues
    rig.clock.advance(1)
    rig.tasks.sweep(rig.clock())
    assert "q" not in rig.tasks.vhosts["/"].queues


def test_a_queue_with_consumers_never_expires_and_its_timer_starts_when_the_last_goes():
    rig = Rig(A)
    rig.declare("q", arguments={"x-expires": 1000})
    rig.tasks.consume(A, 1, "q", "c")
    rig.clock.advance(3600)
    rig.tasks.sweep(rig.clock())
    assert "q" in rig.tasks.vhosts["/"].queues
    rig.tasks.cancel(A, 1, "c")
    rig.clock.advance(0.5)
    rig.tasks.sweep(rig.clock())
    assert "q" in rig.tasks.vhosts["/"].queues
    rig.clock.advance(0.5)
    rig.tasks.sweep(rig.clock())
    assert "q" not in rig.tasks.vhosts["/"].queues


def test_an_expired_queue_drops_what_it_held_when_given_back():
    rig = Rig(A, B)
    rig.declare("q", arguments={"x-expires": 1000})
    rig.publish("q", b"m")
    got = rig.tasks.get(B, 1, "q")
    assert got is not None
    rig.clock.advance(5)
    rig.tasks.sweep(rig.clock())
    assert "q" not in rig.tasks.vhosts["/"].queues
    rig.tasks.reject(B, 1, [got.tag], requeue=True)  # its queue is gone: dropped
    rig.declare("q")  # a new queue of the same name does not get it
    assert rig.ready("q") == [] and rig.meter.used == 0


# -- message ttl -----------------------------------------------------------------------
def test_x_message_ttl_drops_messages_at_the_head_and_counts_them():
    rig = Rig(A)
    rig.declare("q", arguments={"x-message-ttl": 2000})
    rig.publish("q", b"old")
    rig.clock.advance(1)
    rig.publish("q", b"young")
    rig.clock.advance(1)  # "old" is 2 s old: its deadline has come
    rig.tasks.sweep(rig.clock())
    assert rig.ready("q") == [b"young"]
    assert rig.queue("q").expired == 1 and rig.tasks.expired == 1
    assert rig.meter.used == size(b"young")
    rig.clock.advance(1)
    assert rig.tasks.get(A, 1, "q") is None  # met on the way: dropped, not delivered
    assert rig.queue("q").expired == 2 and rig.queue("q").ready == 0 and rig.meter.used == 0


def test_per_message_ttl_and_the_queue_ttl_the_shorter_wins():
    rig = Rig(A)
    rig.declare("q", arguments={"x-message-ttl": 5000})
    rig.declare("plain")
    rig.publish("q", b"ttl-1", ttl=1)
    rig.publish("q", b"ttl-100", ttl=100)
    rig.publish("plain", b"ttl-1", ttl=1)
    rig.publish("plain", b"forever")
    deadlines = [m.deadline - rig.clock() for m in rig.queue("q").levels[0]]
    assert deadlines == [1, 5]
    assert [m.deadline for m in rig.queue("plain").levels[0]][1] == math.inf
    rig.tasks.consume(A, 1, "plain", "c")
    rig.take(A)
    rig.tasks.cancel(A, 1, "c")
    rig.tasks.recover(A, 1)
    rig.clock.advance(1)
    rig.tasks.consume(A, 1, "plain", "c")
    assert rig.bodies(A) == [b"forever"]  # ttl-1 expired while back in the queue


def test_consumers_never_get_expired_messages():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"a", b"b", ttl=1)
    rig.publish("q", b"c", ttl=10)
    rig.clock.advance(1)
    rig.tasks.consume(A, 1, "q", "c")
    assert rig.bodies(A) == [b"c"]
    assert rig.queue("q").expired == 2 and rig.meter.used == 0


def test_a_long_ttl_message_in_front_shields_shorter_ones_until_it_is_delivered():
    # Documented (as RabbitMQ): expiry looks at the head of each level only.
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"long", ttl=100)
    rig.publish("q", b"short", ttl=1)
    rig.clock.advance(2)
    rig.tasks.sweep(rig.clock())
    assert rig.ready("q") == [b"long", b"short"]  # shielded
    got = rig.tasks.get(A, 1, "q", no_ack=True)
    assert got is not None and got.message.body == b"long"
    assert rig.tasks.get(A, 1, "q", no_ack=True) is None  # now at the head: dropped
    assert rig.queue("q").expired == 1 and rig.meter.used == 0


def test_each_priority_level_expires_at_its_own_head():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"hi-short", ttl=1, priority=9)
    rig.publish("q", b"lo-short", ttl=1)
    rig.publish("q", b"lo-long", ttl=50)
    rig.clock.advance(1)
    rig.tasks.sweep(rig.clock())
    assert rig.ready("q") == [b"lo-long"]
    assert rig.tasks.expired == 2


@pytest.mark.parametrize("ttl", [-1, math.inf, math.nan])
def test_invalid_per_message_ttl_is_refused(ttl):
    rig = Rig(A)
    rig.declare("q")
    with pytest.raises(ex.ProtocolError):
        rig.tasks.publish(A, "", "q", b"x", 0, ttl)
    assert rig.ready("q") == []


# -- x-max-length and the memory limit ------------------------------------------------
def test_x_max_length_refuses_with_queue_full():
    rig = Rig(A)
    rig.declare("q", arguments={"x-max-length": 2})
    rig.publish("q", b"1", b"2")
    with pytest.raises(ex.QueueFull) as info:
        rig.publish("q", b"3")
    assert (info.value.channel, info.value.capacity) == ("q", 2)
    assert rig.ready("q") == [b"1", b"2"]
    rig.tasks.get(A, 1, "q")  # unacked messages do not count
    rig.publish("q", b"3")
    assert rig.ready("q") == [b"2", b"3"]


def test_expired_messages_do_not_count_against_x_max_length():
    rig = Rig(A)
    rig.declare("q", arguments={"x-max-length": 2, "x-message-ttl": 1000})
    rig.publish("q", b"1", b"2")
    rig.clock.advance(1)  # both expired; no sweep yet
    rig.publish("q", b"3")
    assert rig.ready("q") == [b"3"] and rig.queue("q").expired == 2
    assert rig.meter.used == size(b"3")


def test_a_full_queue_refuses_the_whole_fanout_publish():
    rig = Rig(A)
    rig.tasks.declare_exchange(A, "fx", "fanout")
    rig.declare("roomy")
    rig.declare("tight", arguments={"x-max-length": 0})
    rig.tasks.bind(A, "roomy", "fx", "")
    rig.tasks.bind(A, "tight", "fx", "")
    with pytest.raises(ex.QueueFull):
        rig.publish("", b"m", exchange="fx")
    assert rig.ready("roomy") == [] and rig.meter.used == 0


def test_the_memory_limit_refuses_with_queue_full_and_a_reason():
    rig = Rig(A, limit=2 * size(b"12345"))
    rig.declare("q")
    rig.publish("q", b"12345", b"12345")
    with pytest.raises(ex.QueueFull) as info:
        rig.publish("q", b"1")
    assert "memory" in info.value.reason
    assert rig.meter.used == 2 * size(b"12345")
    rig.tasks.purge(A, "q")
    rig.publish("q", b"1")


@pytest.mark.parametrize(
    "arguments",
    [
        {"x-max-length": -1},
        {"x-max-length": 1.5},
        {"x-max-length": True},
        {"x-expires": -5},
        {"x-expires": 0},  # RabbitMQ refuses it too
        {"x-expires": "10"},
        {"x-expires": True},
        {"x-message-ttl": math.nan},
        {"x-message-ttl": 1e13},
    ],
)
def test_invalid_queue_arguments_are_a_precondition_failure(arguments):
    rig = Rig(A)
    with pytest.raises(ex.PreconditionFailed):
        rig.declare("q", arguments=arguments)
    assert "q" not in rig.tasks.vhosts["/"].queues


# -- errors ----------------------------------------------------------------------------
def test_passive_declare_of_a_missing_queue_is_not_found():
    rig = Rig(A)
    with pytest.raises(ex.NotFound) as info:
        rig.declare("missing", passive=True)
    assert (info.value.kind, info.value.name) == ("queue", "missing")
    assert "missing" not in rig.tasks.vhosts["/"].queues
    rig.declare("there")
    rig.publish("there", b"m")
    rig.tasks.consume(A, 1, "there", "c")
    rig.publish("there", b"m")  # delivered at once: not ready
    assert rig.tasks.declare_queue(A, "there", passive=True) == ("there", 0, 1)
    rig.tasks.cancel(A, 1, "c")
    rig.tasks.recover(A, 1)
    assert rig.tasks.declare_queue(A, "there") == ("there", 2, 0)


def test_passive_declare_of_an_existing_empty_queue_succeeds():
    rig = Rig(A, B)
    rig.declare("q")
    assert rig.tasks.declare_queue(B, "q", passive=True) == ("q", 0, 0)


@pytest.mark.parametrize(
    "use",
    [
        lambda t: t.declare_queue(B, "excl"),
        lambda t: t.declare_queue(B, "excl", passive=True),
        lambda t: t.consume(B, 1, "excl", "c"),
        lambda t: t.get(B, 1, "excl"),
        lambda t: t.bind(B, "excl", "amq.direct", "k"),
        lambda t: t.purge(B, "excl"),
        lambda t: t.delete_queue(B, "excl"),
        lambda t: t.size(B, "excl"),
    ],
)
def test_an_exclusive_queue_is_locked_to_its_connection(use):
    rig = Rig(A, B)
    rig.declare("excl", exclusive=True)
    rig.publish("excl", b"m")
    with pytest.raises(ex.ResourceLocked) as info:
        use(rig.tasks)
    assert info.value.name == "excl"
    assert rig.ready("excl") == [b"m"]  # untouched
    assert rig.tasks.declare_queue(A, "excl") == ("excl", 1, 0)


def test_publishing_to_an_exclusive_queue_of_another_connection_is_allowed():
    rig = Rig(A, B)
    rig.declare("excl", exclusive=True)
    assert rig.tasks.publish(B, "", "excl", b"m", 0, 0) == 1  # as AMQP: only use is locked


def test_redeclaring_an_exchange_with_another_type_fails():
    rig = Rig(A, B)
    rig.tasks.declare_exchange(A, "x", "direct")
    rig.tasks.declare_exchange(B, "x", "direct")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.declare_exchange(B, "x", "topic")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.declare_exchange(A, "amq.direct", "fanout")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.declare_exchange(A, "y", "headers")  # not supported
    assert rig.tasks.vhosts["/"].exchanges["x"].type == "direct"
    assert "y" not in rig.tasks.vhosts["/"].exchanges
    with pytest.raises(ex.NotFound) as info:
        rig.tasks.declare_exchange(A, "z", "direct", passive=True)
    assert (info.value.kind, info.value.name) == ("exchange", "z")
    with pytest.raises(ex.NotFound):
        rig.tasks.bind(A, "nope", "x", "k")  # the queue is looked up first
    rig.declare("q")
    with pytest.raises(ex.NotFound):
        rig.tasks.bind(A, "q", "z", "k")


def test_delete_queue_if_unused_and_if_empty():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"1", b"2")
    rig.tasks.consume(A, 1, "q", "c")
    rig.publish("q", b"3")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.delete_queue(A, "q", if_unused=True)
    rig.tasks.cancel(A, 1, "c")
    rig.tasks.recover(A, 1)
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.delete_queue(A, "q", if_empty=True)
    assert rig.tasks.delete_queue(A, "q", if_unused=True) == 3
    assert rig.tasks.delete_queue(A, "q") == 0  # missing: nothing to do
    rig.declare("empty")
    rig.tasks.consume(A, 1, "empty", "c")
    assert rig.tasks.delete_queue(A, "empty", if_empty=True) == 0
    assert rig.tasks.clients[A].sessions[1].consumers == {}  # its consumers went with it
    assert rig.meter.used == 0


def test_purge_returns_the_true_count_and_leaves_unacked_alone():
    rig = Rig(A)
    rig.declare("q")
    rig.publish("q", b"1", b"2")
    rig.publish("q", b"9", priority=9)
    got = rig.tasks.get(A, 1, "q")
    assert got is not None and got.message.body == b"9"
    assert rig.tasks.purge(A, "q") == 2
    assert rig.tasks.purge(A, "q") == 0
    assert rig.queue("q").unacked == 1 and rig.meter.used == 0
    rig.tasks.reject(A, 1, [got.tag], requeue=True)
    assert rig.ready("q") == [b"9"] and rig.tasks.size(A, "q") == 1
    assert rig.meter.used == size(b"9")
    with pytest.raises(ex.NotFound):
        rig.tasks.purge(A, "missing")


@pytest.mark.parametrize(
    "command",
    [
        lambda t: t.declare_queue(A, "q"),
        lambda t: t.declare_exchange(A, "x", "direct"),
        lambda t: t.delete_exchange(A, "x"),
        lambda t: t.bind(A, "q", "x", ""),
        lambda t: t.unbind(A, "q", "x", ""),
        lambda t: t.purge(A, "q"),
        lambda t: t.delete_queue(A, "q"),
        lambda t: t.size(A, "q"),
        lambda t: t.publish(A, "", "q", b"m", 0, 0),
        lambda t: t.consume(A, 1, "q", "c"),
        lambda t: t.cancel(A, 1, "c"),
        lambda t: t.qos(A, 1, 1),
        lambda t: t.get(A, 1, "q"),
        lambda t: t.ack(A, 1, [1]),
        lambda t: t.reject(A, 1, [1], requeue=True),
        lambda t: t.recover(A, 1),
    ],
)
def test_commands_before_open_are_a_protocol_error(command):
    rig = Rig()
    with pytest.raises(ex.ProtocolError):
        command(rig.tasks)
    rig.tasks.close_session(A, 1)  # harmless
    assert rig.tasks.drop_client(A) == 0


@pytest.mark.parametrize("name", ["x" * (MAX_NAME + 1), "nul\x00", 7, None])
def test_invalid_names_are_refused(name):
    rig = Rig(A)
    with pytest.raises(ex.ProtocolError):
        rig.tasks.declare_queue(A, name)
    with pytest.raises(ex.ProtocolError):
        rig.tasks.declare_exchange(A, name, "direct")
    with pytest.raises(ex.ProtocolError):
        rig.tasks.open(B, name)
    assert rig.tasks.vhosts["/"].queues == {}


def test_anonymous_queue_is_refused_and_a_max_length_name_is_fine():
    rig = Rig(A)
    with pytest.raises(ex.PreconditionFailed):
        rig.declare("")
    rig.declare("x" * MAX_NAME)


def test_consumer_tags_and_session_numbers_are_checked():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "c")
    with pytest.raises(ex.PreconditionFailed):
        rig.tasks.consume(A, 1, "q", "c")  # in use on this session
    rig.tasks.consume(A, 2, "q", "c")  # fine on another
    for bad_tag in ("", "t" * (MAX_NAME + 1), 5):
        with pytest.raises(ex.ProtocolError):
            rig.tasks.consume(A, 1, "q", bad_tag)
    for bad_session in (-1, 1 << 16, "1", None):
        with pytest.raises(ex.ProtocolError):
            rig.tasks.qos(A, bad_session, 1)
    with pytest.raises(ex.NotFound):
        rig.tasks.consume(A, 1, "missing", "d")
    assert len(rig.queue("q").consumers) == 2


# -- the memory meter ----------------------------------------------------------------
def test_the_meter_counts_ready_messages_only_and_returns_to_zero():
    rig = Rig(A, B)
    rig.declare("q")
    rig.declare("r", arguments={"x-message-ttl": 1000})
    rig.tasks.declare_exchange(A, "fx", "fanout")
    rig.tasks.bind(A, "q", "fx", "")
    rig.tasks.bind(A, "r", "fx", "")
    rig.publish("", b"abc", exchange="fx")  # counted once per queue
    assert rig.meter.used == 2 * size(b"abc") == rig.ready_bytes()
    rig.tasks.qos(B, 1, 1)
    rig.tasks.consume(B, 1, "q", "c")
    [d] = rig.take(B)
    assert rig.meter.used == size(b"abc")  # delivered: out of the meter
    rig.tasks.reject(B, 1, [d.tag], requeue=True)  # back: counted again, and at once delivered again
    [d] = rig.take(B)
    assert rig.meter.used == size(b"abc")
    rig.tasks.ack(B, 1, [d.tag])
    rig.clock.advance(1)
    rig.tasks.sweep(rig.clock())  # r's copy expired
    assert rig.meter.used == 0
    rig.publish("q", b"1", b"22", b"333")  # 1 to B, 2 ready
    rig.publish("r", b"4444")
    assert rig.meter.used == rig.ready_bytes() == size(b"22") + size(b"333") + size(b"4444")
    rig.tasks.purge(A, "r")
    rig.tasks.drop_client(B)  # its "1" goes back
    assert rig.meter.used == rig.ready_bytes() == size(b"1") + size(b"22") + size(b"333")
    rig.tasks.delete_queue(A, "q")
    assert rig.meter.used == rig.ready_bytes() == 0


# -- undeliver (a send the shell could not do) ------------------------------------------
def test_undeliver_returns_tracked_deliveries_to_the_head_not_redelivered():
    rig = Rig(A)
    deliveries = consumed(rig, b"1", b"2", b"3", prefetch=2)
    assert rig.ready("q") == [b"3"]
    rig.tasks.cancel(A, 1, "c")  # so that nothing is delivered again at once
    rig.tasks.undeliver(deliveries)
    assert rig.ready("q") == [b"1", b"2", b"3"]
    assert [m.redelivered for m in rig.queue("q").levels[0]] == [False] * 3
    assert rig.queue("q").unacked == 0 and rig.queue("q").redelivered == 0
    assert rig.tasks.clients[A].sessions[1].unacked == {}
    assert rig.meter.used == rig.ready_bytes()


def test_undeliver_returns_no_ack_deliveries_too():
    rig = Rig(A, B)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "auto", no_ack=True)
    rig.publish("q", b"1", b"2")
    deliveries = rig.take(A)
    rig.tasks.cancel(A, 1, "auto")
    rig.tasks.undeliver(deliveries)
    assert rig.ready("q") == [b"1", b"2"]
    assert not any(m.redelivered for m in rig.queue("q").levels[0])
    assert rig.meter.used == rig.ready_bytes()


def test_undeliver_keeps_the_order_of_tracked_and_no_ack_deliveries_of_one_queue():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "auto", no_ack=True)
    rig.tasks.consume(A, 2, "q", "acked")
    rig.publish("q", b"1", b"2", b"3", b"4")
    deliveries = rig.take(A)
    assert [(d.tracked, d.message.body) for d in deliveries] == [
        (False, b"1"),
        (True, b"2"),
        (False, b"3"),
        (True, b"4"),
    ]
    rig.tasks.cancel(A, 1, "auto")
    rig.tasks.cancel(A, 2, "acked")
    rig.tasks.undeliver(deliveries)
    assert rig.ready("q") == [b"1", b"2", b"3", b"4"]
    assert rig.queue("q").unacked == 0 and rig.meter.used == rig.ready_bytes()


def test_undelivered_messages_go_to_the_next_consumer_at_once():
    rig = Rig(A, B)
    deliveries = consumed(rig, b"1", b"2")
    rig.tasks.consume(B, 1, "q", "c")
    rig.tasks.drop_client(A)
    rig.take(B)
    rig.tasks.undeliver(deliveries)  # A's, given back by drop_client already: no duplicates
    assert rig.take() == [] and rig.ready("q") == []
    assert rig.queue("q").unacked == 2  # B holds them, once


def test_undeliver_after_the_client_dropped_does_not_duplicate():
    rig = Rig(A)
    tracked = consumed(rig, b"1", b"2")
    rig.tasks.drop_client(A)
    assert rig.ready("q") == [b"1", b"2"]
    rig.tasks.undeliver(tracked)
    assert rig.ready("q") == [b"1", b"2"]
    assert rig.meter.used == rig.ready_bytes()


def test_undeliver_of_an_acked_delivery_does_nothing():
    rig = Rig(A)
    [delivery] = consumed(rig, b"1")
    rig.tasks.ack(A, 1, [delivery.tag])
    rig.tasks.undeliver([delivery])
    assert rig.ready("q") == [] and rig.meter.used == 0


def test_undeliver_to_a_deleted_queue_drops():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "auto", no_ack=True)
    rig.tasks.consume(A, 2, "q", "acked")
    rig.publish("q", b"1", b"2")
    deliveries = rig.take(A)
    rig.tasks.delete_queue(A, "q")
    rig.declare("q")
    rig.tasks.undeliver(deliveries)
    assert rig.ready("q") == [] and rig.meter.used == 0


def test_retry_delivers_wherever_a_consumer_has_room():
    rig = Rig(A)
    deliveries = consumed(rig, b"1", b"2")
    rig.tasks.cancel(A, 1, "c")
    rig.tasks.undeliver(deliveries)
    rig.tasks.consume(A, 1, "q", "c2")
    assert rig.bodies(A) == [b"1", b"2"]
    rig.tasks.retry()  # nothing ready: nothing happens
    assert rig.take() == []


# -- introspection -------------------------------------------------------------------
def test_stats_and_queue_stats():
    rig = Rig(A)
    rig.declare("q")
    rig.tasks.consume(A, 1, "q", "c")
    rig.publish("q", b"1", b"2")
    rig.tasks.ack(A, 1, [1])
    rig.tasks.reject(A, 1, [2], requeue=True)
    rig.publish("missing", b"x")
    assert rig.tasks.stats() == {
        "task_queues": 1,
        "task_ready": 0,
        "task_unacked": 1,
        "task_consumers": 1,
        "task_unroutable": 1,
    }
    [stats] = rig.tasks.queue_stats()
    assert stats == {
        "name": "q",
        "ready": 0,
        "unacked": 1,
        "consumers": 1,
        "published": 2,
        "delivered": 3,
        "acked": 1,
        "redelivered": 1,
        "expired": 0,
    }
    assert "q" in repr(rig.queue("q")) and "bytes" in repr(rig.queue("q").levels[0] or TaskMessage(b"abc"))


# -- random operations: invariants ------------------------------------------------------
IDENTS = (A, B, C)
QUEUES = ("q0", "q1", "q2")
SESSIONS = (1, 2)


class TasksMachine(RuleBasedStateMachine):
    """Three connections, two sessions each, three queues, a fanout and a
    topic exchange, and a shell that sends, or fails to send, what the model
    decided. After every step: the meter counts exactly the ready messages,
    every message is in one place only, a message that left (acked,
    consumed without ack, dropped, expired, purged, deleted) never comes
    back, the queues' counters match, no session holds more than its
    prefetch, no queue keeps a ready message from a consumer with room, and
    a message a client received is marked redelivered when it comes again."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.meter = MemoryMeter(20_000)
        self.pending: list[tuple[bytes, Delivery]] = []  # decided, not yet sent
        self.tasks = Tasks(clock=self.clock, sink=self._sink, meter=self.meter)
        #: (ident, session id) -> tags the client received and has not settled
        self.held: dict[tuple[bytes, int], list[int]] = {}
        self.seen: dict[int, TaskMessage] = {}  # every message ever present (kept alive: ids stay unique)
        self.gone: set[int] = set()
        self.arrived: set[int] = set()  # messages a client received
        self.bodies = 0
        for ident in IDENTS:
            self.tasks.open(ident, "/")
        self.tasks.declare_exchange(A, "fx", "fanout")
        self.tasks.declare_exchange(A, "tx", "topic")

    def _sink(self, ident: bytes, delivery: Delivery) -> None:
        session = delivery.session
        if delivery.tracked and session.prefetch and delivery.consumer:
            assert len(session.unacked) <= session.prefetch, "delivered past the prefetch limit"
        assert session.client is self.tasks.clients.get(ident), "delivered to a connection that is gone"
        self._check_redelivered(delivery)
        self.pending.append((ident, delivery))

    def _check_redelivered(self, delivery: Delivery) -> None:
        if id(delivery.message) in self.arrived:
            assert delivery.message.redelivered, "a message delivered before is not marked redelivered"

    # -- where each message is ----------------------------------------------------
    def _places(self) -> list[TaskMessage]:
        places: list[TaskMessage] = []
        for vhost in self.tasks.vhosts.values():
            for queue in vhost.queues.values():
                for level in queue.levels:
                    places.extend(level)
        for client in self.tasks.clients.values():
            for session in client.sessions.values():
                places.extend(message for _, message in session.unacked.values())
        places.extend(d.message for _, d in self.pending if not d.tracked)
        return places

    def _queues(self) -> list[TaskQueue]:
        return list(self.tasks.vhosts["/"].queues.values())

    # -- rules ------------------------------------------------------------------------
    @rule(
        name=st.sampled_from(QUEUES),
        ident=st.sampled_from(IDENTS),
        ttl=st.sampled_from([None, 1000, 3000]),
        expires=st.sampled_from([None, 2000]),
        max_length=st.sampled_from([None, 3]),
        auto_delete=st.booleans(),
        exclusive=st.booleans(),
        bind=st.sampled_from(["", "fx", "tx"]),
    )
    def declare(self, name, ident, ttl, expires, max_length, auto_delete, exclusive, bind):
        arguments = {k: v for k, v in (("x-message-ttl", ttl), ("x-expires", expires), ("x-max-length", max_length))}
        arguments = {k: v for k, v in arguments.items() if v is not None}
        try:
            self.tasks.declare_queue(ident, name, exclusive=exclusive, auto_delete=auto_delete, arguments=arguments)
            if bind:
                self.tasks.bind(ident, name, bind, "a.#" if bind == "tx" else "")
        except ex.ResourceLocked:
            pass

    @rule(
        to=st.sampled_from((*QUEUES, "fx", "tx")),
        priority=st.integers(-1, 10),
        ttl=st.sampled_from([0.0, 0.0, 1.0, 5.0]),
        count=st.integers(1, 4),
    )
    def publish(self, to, priority, ttl, count):
        exchange, key = (to, "a.b") if to in ("fx", "tx") else ("", to)
        for _ in range(count):
            self.bodies += 1
            try:
                self.tasks.publish(B, exchange, key, b"m%d" % self.bodies, priority, ttl)
            except ex.QueueFull:
                pass

    @rule(
        ident=st.sampled_from(IDENTS),
        session=st.sampled_from(SESSIONS),
        name=st.sampled_from(QUEUES),
        tag=st.sampled_from(["t1", "t2"]),
        no_ack=st.booleans(),
    )
    def consume(self, ident, session, name, tag, no_ack):
        try:
            self.tasks.consume(ident, session, name, tag, no_ack=no_ack)
        except (ex.NotFound, ex.ResourceLocked, ex.PreconditionFailed):
            pass

    @rule(ident=st.sampled_from(IDENTS), session=st.sampled_from(SESSIONS), tag=st.sampled_from(["t1", "t2"]))
    def cancel(self, ident, session, tag):
        self.tasks.cancel(ident, session, tag)

    @rule(ident=st.sampled_from(IDENTS), session=st.sampled_from(SESSIONS), prefetch=st.integers(0, 3))
    def qos(self, ident, session, prefetch):
        self.tasks.qos(ident, session, prefetch)

    @rule(
        ident=st.sampled_from(IDENTS),
        session=st.sampled_from(SESSIONS),
        name=st.sampled_from(QUEUES),
        no_ack=st.booleans(),
    )
    def get(self, ident, session, name, no_ack):
        try:
            delivery = self.tasks.get(ident, session, name, no_ack=no_ack)
        except (ex.NotFound, ex.ResourceLocked):
            return
        if delivery is not None:  # a reply in the outbox, like the consumers' deliveries
            self._check_redelivered(delivery)
            self.pending.append((ident, delivery))

    @rule(outcome=st.lists(st.sampled_from(["sent", "sent", "busy", "gone"]), min_size=3, max_size=3))
    def send(self, outcome):
        """The shell sends what is pending, peer by peer; a peer fails
        (busy or gone) from some message on, as with ROUTER_MANDATORY."""
        pending, self.pending = self.pending, []
        for ident, mode in zip(IDENTS, outcome, strict=True):
            mine = [d for who, d in pending if who == ident]
            if not mine:
                continue
            if mode == "sent":
                for delivery in mine:
                    self.arrived.add(id(delivery.message))
                    session = self.tasks.clients[ident].sessions.get(delivery.session.id)
                    if delivery.tracked and session is delivery.session and delivery.tag in session.unacked:
                        self.held.setdefault((ident, session.id), []).append(delivery.tag)
                continue
            if mode == "gone":  # as Broker.send_failed: the connection is dropped first
                self._forget(ident)
                self.tasks.drop_client(ident)
            self.tasks.undeliver(mine)
            self.tasks.retry()  # the broker's next tick (tasks_stalled)
            if mode == "gone":
                self.tasks.open(ident, "/")  # it comes back, afresh

    def _forget(self, ident: bytes, session: Optional[int] = None) -> None:
        for key in [k for k in self.held if k[0] == ident and session in (None, k[1])]:
            del self.held[key]

    @rule(
        ident=st.sampled_from(IDENTS),
        session=st.sampled_from(SESSIONS),
        how=st.sampled_from(["ack", "ack-multiple", "requeue", "drop", "requeue-multiple", "unknown"]),
        pick=st.integers(0, 5),
    )
    def settle(self, ident, session, how, pick):
        tags = self.held.get((ident, session), [])
        if how == "unknown":
            self.tasks.ack(ident, session, [1000 + pick])
            return
        if not tags:
            return
        tag = tags[pick % len(tags)]
        multiple = how.endswith("multiple")
        settled = [t for t in tags if t <= tag] if multiple else [tag]
        if how.startswith("ack"):
            self.tasks.ack(ident, session, [tag], multiple=multiple)
        else:
            self.tasks.reject(ident, session, [tag], requeue=how != "drop", multiple=multiple)
        self.held[(ident, session)] = [t for t in tags if t not in settled]

    @rule(ident=st.sampled_from(IDENTS), session=st.sampled_from(SESSIONS))
    def recover(self, ident, session):
        self.tasks.recover(ident, session)
        self._forget(ident, session)

    @rule(ident=st.sampled_from(IDENTS), session=st.sampled_from(SESSIONS))
    def close_session(self, ident, session):
        self.tasks.close_session(ident, session)
        self._forget(ident, session)

    @rule(ident=st.sampled_from(IDENTS))
    def reconnect(self, ident):
        """The connection is dropped (or reconnects afresh with Open)."""
        self._forget(ident)
        self.tasks.open(ident, "/")

    @rule(ident=st.sampled_from(IDENTS), name=st.sampled_from(QUEUES))
    def purge(self, ident, name):
        try:
            self.tasks.purge(ident, name)
        except (ex.NotFound, ex.ResourceLocked):
            pass

    @rule(ident=st.sampled_from(IDENTS), name=st.sampled_from(QUEUES), if_unused=st.booleans())
    def delete(self, ident, name, if_unused):
        try:
            self.tasks.delete_queue(ident, name, if_unused=if_unused)
        except (ex.ResourceLocked, ex.PreconditionFailed):
            pass

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5]))
    def sweep(self, seconds):
        self.clock.advance(seconds)
        self.tasks.sweep(self.clock())

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def meter_counts_the_ready_messages(self):
        ready = [m for q in self._queues() for level in q.levels for m in level]
        assert self.meter.used == sum(m.size for m in ready)

    @invariant()
    def every_message_is_in_one_place_and_what_left_never_comes_back(self):
        places = self._places()
        present = {id(m): m for m in places}
        assert len(present) == len(places), "a message is in two places"
        assert not present.keys() & self.gone, "a message came back after it left"
        self.seen.update(present)
        self.gone.update(self.seen.keys() - present.keys())

    @invariant()
    def queue_counters_match(self):
        held: dict[int, int] = {}
        for client in self.tasks.clients.values():
            for session in client.sessions.values():
                for queue, _ in session.unacked.values():
                    held[id(queue)] = held.get(id(queue), 0) + 1
        for queue in self._queues():
            assert queue.ready == sum(len(level) for level in queue.levels)
            assert queue.unacked == held.get(id(queue), 0)
            assert all(consumer.queue is queue for consumer in queue.consumers)
            assert all(c.session.consumers.get(c.tag) is c for c in queue.consumers)

    @invariant()
    def no_ready_message_waits_for_a_consumer_with_room(self):
        now = self.clock()
        for queue in self._queues():
            live = any(m.deadline > now for level in queue.levels for m in level)
            if live:
                assert not any(c.no_ack or c.session.room() > 0 for c in queue.consumers), queue

    def teardown(self):
        """Everyone leaves, what was in flight fails, the queues go: nothing is left counted."""
        for ident in IDENTS:
            self.tasks.drop_client(ident)
        self.tasks.undeliver(d for _, d in self.pending)
        for queue in self._queues():
            self.tasks.open(A, "/")
            self.tasks.delete_queue(A, queue.name)
        assert self.meter.used == 0
        assert self.tasks.stats()["task_queues"] == 0


TestTasksMachine = TasksMachine.TestCase
TestTasksMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
