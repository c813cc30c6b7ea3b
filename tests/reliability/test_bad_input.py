"""Bad input: a raw ZeroMQ DEALER throws malformed, truncated, mutated,
wrong-version, unknown-command, wrongly typed, badly named and oversized
messages at a live broker process, while a well-behaved client keeps doing
round trips through the same broker. Then the Channels layer's own checks.

Oracles for the raw fuzzer: the broker stays up; every reply decodes and
carries a known error code, never "internal error" (code 99, a bug caught by
the broker's last-resort handler); the good client's round trips keep
succeeding with a bounded worst latency; afterwards the broker's RSS is back
near its baseline and it still serves a new client.

Inputs come from a seeded ``random.Random`` (``DMB_FUZZ_SEED`` to replay;
the seed is printed), which is fast enough for 100,000+ inputs per CI run;
the layer tests use Hypothesis.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import struct
import time
from collections import Counter
from typing import Any, Callable, Iterator

import msgspec
import pytest
import zmq
import zmq.utils.monitor
from channels.exceptions import ChannelFull as ChannelsChannelFull
from channels.exceptions import MessageTooLarge as ChannelsMessageTooLarge
from dmb_reliability import FAST, BrokerProcess, GoodClient, soak, wait_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from django_message_broker import SyncClient
from django_message_broker import protocol as p
from django_message_broker.exceptions import ProtocolError
from django_message_broker.layer import ChannelsServerLayer, ForeignChannel
from django_message_broker.options import DEFAULT_MAX_MESSAGE_SIZE

SEED = int(os.environ.get("DMB_FUZZ_SEED", "20240611"))
MiB = 1 << 20
RSS_SLACK = 30 * MiB
LATENCY_BOUND = 2.0  # seconds, worst good-client round trip during fuzzing
# ok, QueueFull, MessageTooLarge, InvalidName, SubscriptionError, ProtocolError,
# and the task queues' NotFound, ResourceLocked, PreconditionFailed
KNOWN_CODES = {0, 1, 2, 3, 4, 5, 10, 11, 12}
GOOD_CHANNEL = "good-client-round-trips"
_pack = msgspec.msgpack.encode
V = bytes([p.VERSION])


# -- the raw peer --------------------------------------------------------------------------
class RawPeer:
    """A DEALER that sends whatever it is given and reads every reply."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, 10_000)
        self.socket.setsockopt(zmq.ROUTING_ID, b"fuzzer-" + os.urandom(6).hex().encode())
        self.socket.connect(address)
        self.codes: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.undecodable = 0
        self.internal_errors: list[str] = []
        self.replies: list[Any] = []  # kept only when asked (keep=True)
        self.keep = False
        self._mark = 1 << 40

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames, copy=True)

    def _account(self, frames: list[bytes]) -> Any:
        try:
            msg = p.decode_to_client(frames[0])
        except ProtocolError:
            self.undecodable += 1
            return None
        self.kinds[type(msg).__name__] += 1
        if isinstance(msg, p.Reply):
            self.codes[msg.code] += 1
            if msg.code not in KNOWN_CODES and len(self.internal_errors) < 20:
                self.internal_errors.append(f"code {msg.code}: {msg.detail}")
        if self.keep:
            self.replies.append(msg)
        return msg

    def drain(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._account(frames)

    def sync(self, timeout: float = 30.0) -> None:
        """Wait until the broker has handled everything sent so far (it
        answers one peer's messages in order)."""
        self._mark += 1
        mark = self._mark
        self.send([p.encode(p.Heartbeat(mark))])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                frames = self.socket.recv_multipart()
                msg = self._account(frames)
                if isinstance(msg, p.Reply) and msg.req == mark:
                    return
        raise AssertionError(f"the broker did not answer the fuzzer's marker within {timeout}s")

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


# -- the well-behaved client ----------------------------------------------------------------
def check_good_client(good: GoodClient, minimum: int) -> None:
    assert not good.errors, f"good client failed: {good.errors[:5]}"
    assert len(good.latencies) >= minimum, f"only {len(good.latencies)} round trips during the fuzzing"
    worst = max(good.latencies)
    assert worst < LATENCY_BOUND, f"worst good-client round trip {worst:.2f}s"


# -- input generators --------------------------------------------------------------------------
NAME_POOL = [f"fz-{i}" for i in range(6)] + [f"fz-{i}!p" for i in range(3)]
GROUP_POOL = [f"fzg-{i}" for i in range(4)]
WEIRD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-300, 1e308, -0.0, 5.0]
WEIRD_INTS = [-(2**63), -1, 0, 1, 2**31, 2**62, 2**63 - 1, 2**64 - 1]
BAD_NAMES = [
    "",
    " ",
    "a b",
    "x" * 100,
    "x" * 5000,
    "ä",
    "名字",
    "a\n",
    "\n",
    "a\x00b",
    "a/b",
    "a:b",
    "!",
    "!!",
    "a!!b",
    "a!b!c",
    "a*",
    "a?",
    "\ufffd",
    "a\tb",
    "#",
    "é!x",
    "-" * 99 + "!",
]


def _valid_name(rng: random.Random) -> str:
    return rng.choice(NAME_POOL)


def _random_text(rng: random.Random) -> str:
    alphabet = "abc-_.!\x00\n \u00e9\u540d/:*"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def valid_command(rng: random.Random) -> tuple[Any, list[bytes]]:
    """A well-formed command on the fuzzer's own channels and groups (never
    Flush: that would empty the good client's channel too)."""
    req = rng.randrange(1, 1 << 30)
    body = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    kind = rng.randrange(12)
    if kind == 10:
        names = [_valid_name(rng) for _ in range(rng.randrange(0, 4))]
        return p.Consumed(rng.choice([0, 0, 1]), names, [rng.randrange(0, 5) for _ in names]), []
    if kind == 0:
        ttl, capacity = rng.choice([1.0, 5.0, 30.0]), rng.randrange(1, 50)
        return p.Send(req, _valid_name(rng), ttl, capacity, rng.random() < 0.5), body
    if kind == 1:
        return p.GroupSend(req, rng.choice(GROUP_POOL), 5.0, 10), body[:1]
    if kind == 2:
        return p.GroupAdd(req, rng.choice(GROUP_POOL), _valid_name(rng), rng.choice([1.0, 30.0])), []
    if kind == 3:
        return p.GroupDiscard(req, rng.choice(GROUP_POOL), _valid_name(rng)), []
    if kind == 4:
        return p.Subscribe(req, _valid_name(rng), rng.randrange(0, 20)), []
    if kind == 5:
        return p.Unsubscribe(req, _valid_name(rng)), []
    if kind == 6:
        return p.Return(_valid_name(rng), [rng.choice([0.5, 5.0]) for _ in body]), body
    if kind == 7:
        return p.Hello(req, "fuzz", rng.choice([0.2, 1.0])), []
    if kind == 8:
        return p.Heartbeat(req), []
    if kind == 9:
        return p.Stats(req), []
    return p.Bye(), []


def _safe(frames: list[bytes]) -> list[bytes]:
    """Replace an input that decodes to Flush (possible after mutation)."""
    try:
        if isinstance(p.decode_command(frames[0]), p.Flush):
            return [V + b"\xff"]
    except Exception:
        pass
    return frames


def known_fatal(frames: list[bytes]) -> bool:
    """True for the one input class known to kill the broker: invalid UTF-8
    inside a msgpack string makes ``protocol.decode_command`` raise
    ``UnicodeDecodeError`` instead of ``ProtocolError`` (see
    ``test_invalid_utf8_in_a_header_is_a_protocol_error_not_a_crash``). The
    fuzzer holds such inputs back, counted, so that it can go on testing
    everything else; once the decoder maps them to ``ProtocolError`` this
    returns False and they are sent like any other input."""
    try:
        p.decode_command(frames[0])
    except UnicodeDecodeError:
        return True
    except Exception:
        pass
    return False


def gen_garbage(rng: random.Random) -> list[bytes]:
    frames = [rng.randbytes(rng.choice([0, 1, 2, 3, 8, 40]))]
    for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
        frames.append(rng.randbytes(rng.randrange(0, 32)))
    if rng.random() < 0.3:
        frames[0] = V + frames[0]  # right version, garbage after it
    return _safe(frames)


def gen_truncated(rng: random.Random) -> list[bytes]:
    msg, bodies = valid_command(rng)
    header = p.encode(msg)
    return _safe([header[: rng.randrange(0, len(header))], *bodies])


def gen_mutated(rng: random.Random) -> list[bytes]:
    msg, bodies = valid_command(rng)
    header = bytearray(p.encode(msg))
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(1, len(header)) if len(header) > 1 else 0
        header[i] = rng.randrange(256)
    if rng.random() < 0.2:
        header += rng.randbytes(rng.randrange(1, 8))  # trailing bytes
    return _safe([bytes(header), *bodies])


def gen_wrong_version(rng: random.Random) -> list[bytes]:
    msg, bodies = valid_command(rng)
    header = p.encode(msg)
    version = rng.choice([0, 2, 3, 0x7F, 0x80, 0xFF, rng.randrange(2, 256)])
    return [bytes([version]) + header[1:], *bodies]


def gen_unknown_command(rng: random.Random) -> list[bytes]:
    tag = rng.choice([0, 13, 14, 19, 20, 21, 22, 23, 99, 127, 255, 65535, -1, 2**40, "send", None, 1.5, True])
    fields = [rng.choice([1, "x", None, 2.5, [], {}, b"b"]) for _ in range(rng.randrange(0, 5))]
    payload = _pack([tag, *fields]) if rng.random() < 0.8 else _pack(rng.choice([{"t": tag}, tag, fields, "str", 5]))
    return [V + payload]


def gen_deep_nesting(rng: random.Random) -> list[bytes]:
    """Arrays or maps nested hundreds to tens of thousands deep, as the whole
    header or hidden in a trailing field of a valid command."""
    depth = rng.choice([300, 1200, 3000, 20000])
    opener = rng.choice([b"\x91", b"\x81\x00"])  # [x] or {0: x}
    nested = opener * depth + b"\x00"
    where = rng.randrange(3)
    if where == 0:
        return [V + nested]
    if where == 1:
        return [V + b"\x93\x0a\x01" + nested]  # Heartbeat(req, <trailing>)
    return [V + b"\x94\x02" + nested + b"\xa1x\x00"]  # a Send whose req is nested


def gen_wrong_types(rng: random.Random) -> list[bytes]:
    """A known tag with the wrong number or types of fields."""
    tag = rng.randrange(1, 14) if rng.random() < 0.6 else rng.randrange(30, 47)
    junk = [1, -1, "x", "", None, 2.5, True, [], {}, b"raw", [1, 2], {"a": 1}, 2**63, -(2**63)]
    fields = [rng.choice(junk) for _ in range(rng.randrange(0, 7))]
    return _safe([V + _pack([tag, *fields]), *([rng.randbytes(4)] if rng.random() < 0.5 else [])])


def gen_bad_names(rng: random.Random) -> list[bytes]:
    """Well-typed commands whose channel or group name breaks the rules."""
    req = rng.randrange(1, 1 << 30)
    bad = rng.choice(BAD_NAMES) if rng.random() < 0.7 else _random_text(rng)
    if bad and len(bad) < p.MAX_NAME_LENGTH and p._CHANNEL_RE.fullmatch(bad):
        bad += " "  # the random text happened to be valid: make it invalid
    good = _valid_name(rng)
    body = [b"x"]
    kind = rng.randrange(9)
    cmd: Any
    if kind == 0:
        cmd, frames = p.Send(req, bad, 5.0, 10, rng.random() < 0.5), body
    elif kind == 1:
        cmd, frames = p.GroupSend(req, bad, 5.0, 10), body
    elif kind == 2:
        cmd, frames = p.GroupAdd(req, bad, good, 5.0), []
    elif kind == 3:
        cmd, frames = p.GroupAdd(req, rng.choice(GROUP_POOL), bad, 5.0), []
    elif kind == 4:
        cmd, frames = p.GroupDiscard(req, bad, bad), []
    elif kind == 5:
        cmd, frames = p.Subscribe(req, bad, 5), []
    elif kind == 6:
        cmd, frames = p.Unsubscribe(req, bad), []
    elif kind == 7:
        cmd, frames = p.Consumed(0, [bad], [1]), []
    else:
        cmd, frames = p.Return(bad, [5.0]), body
    return [p.encode(cmd), *frames]


TASK_QUEUES = [f"fzq-{i}" for i in range(6)]
TASK_EXCHANGES = ["", "amq.direct", "amq.topic", "amq.fanout", "fzx-direct", "fzx-topic", "fzx-nope"]


def gen_task_commands(rng: random.Random) -> list[bytes]:
    """Task-queue commands (Celery's side) with odd values, in any order: a
    consume before a declare, acks of tags never given, prefetch and
    priorities out of range, arguments of the wrong types, bodies where
    none belong. Queue names come from a small pool, so state stays bounded."""
    req = rng.randrange(1, 1 << 30)
    queue = rng.choice([*TASK_QUEUES, "", "x" * 300, "bad\x00name"])
    exchange = rng.choice(TASK_EXCHANGES)
    session = rng.choice([1, 2, 0, -1, 1 << 16, 2**63 - 1])
    i = rng.choice([*WEIRD_INTS, 1, 2, 3, 8])
    f = rng.choice(WEIRD_FLOATS)
    kind = rng.randrange(15)
    cmd: Any
    frames: list[bytes] = []
    if kind == 0:
        cmd = p.Open(req, rng.choice(["/", "fz", "", "\x00"]))
    elif kind == 1:
        kind_of = rng.choice(["direct", "topic", "fanout", "headers", ""])
        cmd = p.ExchangeDeclare(req, exchange, kind_of, rng.random() < 0.2)
    elif kind == 2:
        arguments = rng.choice([{}, {"x-expires": i}, {"x-message-ttl": f}, {"x-max-length": i}, {"x-expires": "soon"}])
        cmd = p.QueueDeclare(req, queue, rng.random() < 0.2, False, rng.random() < 0.2, rng.random() < 0.3, arguments)
    elif kind == 3:
        cmd = p.QueueBind(req, queue, exchange, rng.choice(["#", "*.a", "a.#.b", "", "x" * 10]))
    elif kind == 4:
        cmd, frames = p.Publish(req, exchange, queue, i, f, rng.random() < 0.5), [b"task"]
        if rng.random() < 0.1:
            frames = [] if rng.random() < 0.5 else [b"a", b"b"]
    elif kind == 5:
        cmd = p.Consume(req, session, queue, rng.choice(["c1", "c2", ""]), rng.random() < 0.3)
    elif kind == 6:
        cmd = p.Ack(session, [rng.choice([1, 2, 3, i]) for _ in range(rng.randrange(0, 4))], rng.random() < 0.2)
    elif kind == 7:
        cmd = p.Reject(session, [rng.choice([1, 2, i])], rng.random() < 0.5, rng.random() < 0.2)
    elif kind == 8:
        cmd = p.Qos(req, session, i)
    elif kind == 9:
        cmd = p.Get(req, session, queue, rng.random() < 0.5)
    elif kind == 10:
        cmd = p.Recover(req, session)
    elif kind == 11:
        cmd = p.Cancel(req, session, rng.choice(["c1", "c2", "nope"]))
    elif kind == 12:
        cmd = p.CloseSession(req, session)
    elif kind == 13:
        cmd = p.QueuePurge(req, queue) if rng.random() < 0.5 else p.QueueDelete(req, queue, rng.random() < 0.5)
    else:
        cmd = p.ExchangeDelete(req, exchange, rng.random() < 0.5)
    return _safe([p.encode(cmd), *frames])


def gen_wrong_bodies(rng: random.Random) -> list[bytes]:
    """Right header, wrong body frames: missing, extra, too many, mismatched."""
    req = rng.randrange(1, 1 << 30)
    kind = rng.randrange(6)
    if kind == 0:
        return [p.encode(p.Send(req, _valid_name(rng), 5.0, 10, True))]  # no body
    if kind == 1:
        return [p.encode(p.GroupSend(req, rng.choice(GROUP_POOL), 5.0, 10)), b"a", b"b"]  # two bodies
    if kind == 2:
        return [p.encode(p.Return(_valid_name(rng), [1.0, 2.0])), b"only-one"]  # ttls/bodies mismatch
    if kind == 3:
        return [p.encode(p.Heartbeat(req)), b"unexpected body"]
    if kind == 4:
        return [p.encode(p.Hello(req, "fuzz", 1.0)), b"x", b"y"]
    return [p.encode(p.Stats(req)), *([b""] * rng.randrange(1, 4))]


def gen_weird_values(rng: random.Random) -> list[bytes]:
    """Well-typed commands with odd numbers: NaN/inf/negative ttls, huge or
    negative capacities and credits, odd heartbeats."""
    req = rng.randrange(1, 1 << 30)
    f = rng.choice(WEIRD_FLOATS)
    i = rng.choice(WEIRD_INTS)
    kind = rng.randrange(7)
    if kind == 0:
        return [p.encode(p.Send(req, _valid_name(rng), f, max(i, -(2**62)), rng.random() < 0.5)), b"w"]
    if kind == 1:
        return [p.encode(p.GroupSend(req, rng.choice(GROUP_POOL), f, i)), b"w"]
    if kind == 2:
        return [p.encode(p.GroupAdd(req, rng.choice(GROUP_POOL), _valid_name(rng), f))]
    if kind == 3:
        return [p.encode(p.Subscribe(req, _valid_name(rng), i))]
    if kind == 4:
        return [p.encode(p.Return(_valid_name(rng), [f], max(i, -(2**62)))), b"w"]
    if kind == 5:
        names = [_valid_name(rng) for _ in range(rng.randrange(0, 3))]
        counts = [max(rng.choice(WEIRD_INTS), -(2**62)) for _ in range(rng.choice([len(names), len(names) + 1]))]
        return [p.encode(p.Consumed(max(i, -(2**62)), names, counts))]
    return [p.encode(p.Hello(req, "fuzz-" + str(i), f))]


# -- the harness -------------------------------------------------------------------------------
Generator = Callable[[random.Random], list[bytes]]


def fuzz(broker: BrokerProcess, generators: list[Generator], count: int, seed: int) -> dict[str, Any]:
    """Send ``count`` inputs (round robin over ``generators``) in batches
    while a good client does round trips; check every oracle; return figures."""
    rng = random.Random(seed)
    print(f"fuzz seed {seed} ({', '.join(g.__name__ for g in generators)}): replay with DMB_FUZZ_SEED={seed}")
    with SyncClient(broker.address, **FAST) as admin:
        admin.send("warm-up", b"x")
        assert admin.receive("warm-up", timeout=10) == b"x"
        baseline_stats = admin.stats()
    baseline_rss = broker.rss()
    peer = RawPeer(broker.address)
    started = time.monotonic()
    batch = 2000
    with GoodClient(SyncClient(broker.address, **FAST), GOOD_CHANNEL) as good:
        sent = held_back = 0
        while sent < count:
            for _ in range(min(batch, count - sent)):
                frames = generators[sent % len(generators)](rng)
                sent += 1
                if known_fatal(frames):
                    held_back += 1
                    continue
                peer.send(frames)
            peer.drain()
            if sent % (batch * 5) == 0:
                assert broker.alive(), f"the broker died (seed {seed}):\n{broker.log()[-3000:]}"
                peer.sync()  # bound what waits in the broker's socket
        peer.sync()
        elapsed = time.monotonic() - started
        assert broker.alive(), f"the broker died:\n{broker.log()[-3000:]}"
        check_good_client(good, minimum=3)
        round_trips, worst = len(good.latencies), max(good.latencies)
    peak_rss = broker.rss()
    peer.close()
    assert not peer.internal_errors, f"the broker hit internal errors: {peer.internal_errors}"
    assert peer.undecodable == 0, "the broker sent something its own protocol cannot decode"
    assert set(peer.codes) <= KNOWN_CODES, peer.codes
    log = broker.log()
    assert "Traceback" not in log and "error handling" not in log, log[-3000:]

    # Afterwards: the fuzzer's queues and groups are dropped, the broker
    # serves a new client, and its memory is back near the baseline.
    with SyncClient(broker.address, **FAST) as after:
        after.flush()
        after.send("after-fuzz", b"still here")
        assert after.receive("after-fuzz", timeout=10) == b"still here"
        final_stats = after.stats()
    rss = wait_for(lambda: broker.rss() if broker.rss() < baseline_rss + RSS_SLACK else 0, 15, "RSS near baseline")
    figures = {
        "inputs": count,
        "held_back_known_fatal": held_back,
        "seconds": round(elapsed, 2),
        "inputs_per_s": round(count / elapsed),
        "replies_by_code": dict(peer.codes),
        "good_round_trips": round_trips,
        "good_worst_latency_s": round(worst, 3),
        "rss_baseline_mb": round(baseline_rss / MiB, 1),
        "rss_peak_mb": round(peak_rss / MiB, 1),
        "rss_after_mb": round(rss / MiB, 1),
        "broker_errors_counted": final_stats["errors"] - baseline_stats["errors"],
    }
    print("fuzz figures:", figures)
    return figures


@pytest.fixture
def fuzz_broker(broker_proc) -> BrokerProcess:
    return broker_proc("tcp://127.0.0.1:0", "--log-level", "WARNING")


@pytest.mark.timeout(120)
def test_fuzz_garbage_and_truncated_headers(fuzz_broker):
    figures = fuzz(fuzz_broker, [gen_garbage, gen_truncated], 30_000, SEED)
    assert figures["replies_by_code"].get(5, 0) > 10_000  # ProtocolError, typed


@pytest.mark.timeout(120)
def test_fuzz_mutated_headers_and_wrong_versions(fuzz_broker):
    figures = fuzz(fuzz_broker, [gen_mutated, gen_wrong_version], 27_000, SEED + 1)
    assert figures["replies_by_code"].get(5, 0) > 13_500  # every wrong version is refused, and more


@pytest.mark.timeout(120)
def test_fuzz_unknown_commands_wrong_types_and_wrong_bodies(fuzz_broker):
    generators = [gen_unknown_command, gen_wrong_types, gen_wrong_bodies] * 3 + [gen_deep_nesting]
    figures = fuzz(fuzz_broker, generators, 25_000, SEED + 2)
    assert figures["replies_by_code"].get(5, 0) > 20_000


@pytest.mark.timeout(120)
def test_fuzz_bad_names_and_weird_values(fuzz_broker):
    figures = fuzz(fuzz_broker, [gen_bad_names, gen_weird_values, valid_command_frames], 21_000, SEED + 3)
    assert figures["replies_by_code"].get(3, 0) > 5_000  # InvalidName, typed


@pytest.mark.timeout(120)
def test_fuzz_task_queue_commands(fuzz_broker):
    figures = fuzz(fuzz_broker, [gen_task_commands], 20_000, SEED + 4)
    codes = figures["replies_by_code"]
    assert codes.get(0, 0) > 2_000 and codes.get(5, 0) > 1_000 and codes.get(10, 0) > 100


def valid_command_frames(rng: random.Random) -> list[bytes]:
    msg, bodies = valid_command(rng)
    return [p.encode(msg), *bodies]


@soak
@pytest.mark.soak
@pytest.mark.timeout(3000)
def test_soak_fuzz_two_million_inputs(fuzz_broker):
    generators = [
        gen_garbage,
        gen_truncated,
        gen_mutated,
        gen_wrong_version,
        gen_unknown_command,
        gen_wrong_types,
        gen_bad_names,
        gen_wrong_bodies,
        gen_weird_values,
        valid_command_frames,
        gen_deep_nesting,
    ]
    fuzz(fuzz_broker, generators, 2_000_000, SEED + 100)


# -- the one input class found to kill the broker ----------------------------------------------
def _msgpack_str(raw: bytes) -> bytes:
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw  # fixstr holding arbitrary bytes


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "header",
    [
        V + b"\x96\x02\x01" + _msgpack_str(b"ch\xff") + b"\xcb" + struct.pack(">d", 5.0) + b"\x0a\xc3",  # Send
        V + b"\x94\x01\x01" + _msgpack_str(b"\xc3\x28") + b"\xcb" + struct.pack(">d", 1.0),  # Hello
        V + b"\x93\x07\x01" + _msgpack_str(b"\xed\xa0\x80"),  # Unsubscribe, a UTF-8 surrogate
        V + b"\x94\x05\xce)#\xf8\x83\xa5fz\xde-0\xa4fz-50i",  # GroupDiscard, as the fuzzer found it
    ],
    ids=["send-channel", "hello-client-id", "unsubscribe-surrogate", "found-by-fuzzer"],
)
def test_invalid_utf8_in_a_header_is_a_protocol_error_not_a_crash(broker_proc, header):
    """A header whose msgpack string is not UTF-8 is malformed input like any
    other: a ProtocolError reply, and the broker goes on serving."""
    broker = broker_proc()
    peer = RawPeer(broker.address)
    peer.keep = True
    try:
        frames = [header, b"body"] if b"ch\xff" in header else [header]
        peer.send(frames)
        with SyncClient(broker.address, **FAST) as client:
            try:
                client.send("still-serving", b"ok")
                served = client.receive("still-serving", timeout=5) == b"ok"
            except TimeoutError:
                served = False
        assert broker.alive() and served, f"one malformed message stopped the broker:\n{broker.log()[-2500:]}"
        peer.sync()
        assert any(isinstance(r, p.Reply) and r.code == ProtocolError.code for r in peer.replies), peer.replies
    finally:
        peer.close()


# -- oversized bodies ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_oversized_bodies_get_a_typed_reply_and_memory_returns(broker_proc):
    # A 1 MiB limit (the default is 16 MiB), so that 8x the limit stays
    # under the socket's MAXMSGSIZE floor of 64 MiB.
    limit = p_max_body = 1 << 20
    broker = broker_proc("tcp://127.0.0.1:0", "--log-level", "WARNING", "--max-body", str(limit))
    with SyncClient(broker.address, **FAST) as admin:
        assert admin.stats()["queued"] == 0
    baseline = broker.rss()
    peer = RawPeer(broker.address)
    peer.keep = True
    rng = random.Random(SEED)
    sizes = [limit + 1, limit + 7, 2 * limit, 5 * limit, 8 * limit - 1]
    with GoodClient(SyncClient(broker.address, **FAST), GOOD_CHANNEL) as good:
        expected = 0
        for round_ in range(4):
            for size in sizes:
                body = rng.randbytes(size) if round_ == 0 else b"\0" * size
                peer.send([p.encode(p.Send(1000 + expected, "big", 5.0, 10, True)), body])
                peer.send([p.encode(p.GroupSend(2000 + expected, "big-group", 5.0, 10)), body])
                peer.send([p.encode(p.Send(3000 + expected, "big", 5.0, 10, True)), b"small", body])  # one too big
                expected += 1
            peer.sync(60)
        check_good_client(good, minimum=1)
    too_large = [r for r in peer.replies if isinstance(r, p.Reply) and r.code == 2]
    assert len(too_large) == 3 * expected, Counter(getattr(r, "code", None) for r in peer.replies)
    for reply in too_large:
        assert reply.value["limit"] == p_max_body and reply.value["size"] > p_max_body, reply
    # Far past the limit (over the socket's MAXMSGSIZE, 64 MiB) the peer is
    # cut off before the frame is read.
    huge = RawPeer(broker.address)
    monitor = huge.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    huge.send([p.encode(p.Send(1, "big", 5.0, 10, True)), b"\0" * (64 * MiB + 1)])
    events = []
    deadline = time.monotonic() + 30
    while zmq.EVENT_DISCONNECTED not in events and time.monotonic() < deadline:
        if monitor.poll(100):
            events.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
    assert zmq.EVENT_DISCONNECTED in events, "the broker did not cut off a peer sending a 64 MiB frame"
    huge.socket.disable_monitor()
    monitor.close(0)
    huge.close()
    peer.close()
    with SyncClient(broker.address, **FAST) as after:
        after.send("after", b"ok")
        assert after.receive("after", timeout=10) == b"ok"
        assert after.stats()["queued"] == 0, "part of a refused batch was queued"
    wait_for(lambda: broker.rss() < baseline + RSS_SLACK, 15, f"RSS back near {baseline / MiB:.0f} MB")
    assert broker.alive()


# -- peers that misbehave without malformed bytes --------------------------------------------------
@pytest.mark.timeout(120)
def test_a_peer_that_never_reads_its_replies_cannot_grow_the_broker_without_bound(fuzz_broker):
    """Valid requests, replies never read: what the broker buffers for that
    peer must stay bounded (deliveries are bounded by credit; replies too
    must be)."""
    broker = fuzz_broker
    with SyncClient(broker.address, **FAST) as admin:
        admin.stats()
    baseline = broker.rss()
    context = zmq.Context()
    mute = context.socket(zmq.DEALER)
    mute.setsockopt(zmq.LINGER, 0)
    mute.setsockopt(zmq.SNDHWM, 0)
    mute.connect(broker.address)
    try:
        requests = 300_000
        header = p.encode(p.Stats(7))
        for _ in range(requests):
            mute.send(header)
        # Wait until the broker has read them all (its counter), then look.
        with SyncClient(broker.address, **FAST) as admin:
            wait_for(lambda: admin.stats()["received"] >= requests, 90, "the broker to read every request", 0.2)
            growth = broker.rss() - baseline
            assert admin.stats()["clients"] >= 1
        print(f"unread replies: broker RSS +{growth / MiB:.1f} MB after {requests} requests")
        assert growth < RSS_SLACK, f"broker RSS grew {growth / MiB:.0f} MB buffering replies nobody reads"
    finally:
        mute.close(0)
        context.term()


@pytest.mark.timeout(60)
def test_return_frames_cannot_overfill_a_capped_queue(broker_proc):
    """``--max-queue-length`` is documented as a hard cap on any one
    channel's queue. A peer that sends Return frames for messages it was
    never given must not push a queue past it."""
    cap = 50
    broker = broker_proc("tcp://127.0.0.1:0", "--max-queue-length", str(cap))
    peer = RawPeer(broker.address)
    try:
        for _ in range(100):
            bodies = [b"r" * 100] * 50
            peer.send([p.encode(p.Return("capped", [60.0] * len(bodies))), *bodies])
        peer.sync()
        with SyncClient(broker.address, **FAST) as admin:
            queued = admin.stats()["queued"]
        assert queued <= cap, f"{queued} messages queued on a channel capped at {cap}"
    finally:
        peer.close()


@pytest.mark.timeout(60)
def test_huge_credit_grants_are_refused_not_an_internal_error(broker_proc):
    """Subscribe credit is added up without a bound; once the sum no longer
    fits msgpack's 64 bits, the Unsubscribe reply (which reports the credit
    left) cannot be encoded and the peer gets "internal error" (code 99).
    (Found by the 2,000,000-input soak fuzz.) Every reply must be a known,
    typed outcome."""
    broker = broker_proc()
    peer = RawPeer(broker.address)
    peer.keep = True
    try:
        for req in (1, 2, 3):
            peer.send([p.encode(p.Subscribe(req, "credit-overflow", 2**63 - 1))])
        peer.send([p.encode(p.Unsubscribe(77, "credit-overflow"))])
        peer.sync()
        replies = [r for r in peer.replies if isinstance(r, p.Reply) and r.req != peer._mark]
        unknown = [f"req {r.req}: code {r.code} {r.detail}" for r in replies if r.code not in KNOWN_CODES]
        assert not unknown, f"untyped replies: {unknown}"
        assert any(r.req == 77 for r in replies), "the Unsubscribe got no reply"
        assert "error handling" not in broker.log(), broker.log()[-2000:]
    finally:
        peer.close()


@pytest.mark.timeout(60)
def test_nan_ttls_do_not_pin_state_forever(broker_proc):
    """A NaN ttl must be refused or treated as expired: a membership or a
    message that no sweep can ever expire is a leak a peer can repeat."""
    broker = broker_proc()
    peer = RawPeer(broker.address)
    peer.keep = True
    try:
        peer.send([p.encode(p.GroupAdd(11, "nan-group", "nan-member", math.nan))])
        peer.send([p.encode(p.Send(12, "nan-channel", math.nan, 10, True)), b"n"])
        peer.sync()
        refused = {r.req for r in peer.replies if isinstance(r, p.Reply) and r.code != 0}
        with SyncClient(broker.address, **FAST) as admin:
            # The broker sweeps once a second: three seconds cover two sweeps.
            deadline = time.monotonic() + 3.0
            while True:
                stats = admin.stats()
                if not (stats["memberships"] or stats["queued"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        kept = []
        if 11 not in refused and stats["memberships"]:
            kept.append(f"{stats['memberships']} membership(s) with a NaN ttl")
        if 12 not in refused and stats["queued"]:
            kept.append(f"{stats['queued']} message(s) with a NaN ttl")
        assert not kept, f"accepted and never expired: {kept}"
    finally:
        peer.close()


# -- the Channels layer's own checks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_broker(tmp_path_factory) -> Iterator[BrokerProcess]:
    broker = BrokerProcess("tcp://127.0.0.1:0", tmp_path_factory.mktemp("layer-broker")).start()
    yield broker
    broker.kill()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def layer(layer_broker, loop) -> Iterator[ChannelsServerLayer]:
    layer = ChannelsServerLayer(address=layer_broker.address, embedded=False, capacity=5, **FAST)
    yield layer
    loop.run_until_complete(layer.close())


def _run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, 15))


LAYER_SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
non_dicts = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=4),
    st.tuples(st.text(max_size=3)),
    st.sets(st.integers(), max_size=3),
)


@pytest.mark.timeout(120)
@LAYER_SETTINGS
@given(message=non_dicts)
def test_layer_send_refuses_non_dict_messages(layer, loop, message):
    with pytest.raises(TypeError):
        _run(loop, layer.send("layer-bad-input", message))
    with pytest.raises(TypeError):
        _run(loop, layer.group_send("layer-bad-group", message))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "message",
    [
        {"type": "x", "v": object()},
        {"type": "x", "v": 2**64},
        {"type": "x", "v": -(2**63) - 1},
        {"type": "x", "f": print},
    ],
    ids=["object", "int-2**64", "int-below-int64", "function"],
)
def test_layer_send_refuses_unserializable_messages_with_typeerror(layer, loop, message):
    with pytest.raises(TypeError):
        _run(loop, layer.send("layer-bad-input", message))


_NAME_CHARS = st.sampled_from("abcXYZ019-_.!/ :é名\n\t\x00")


@pytest.mark.timeout(180)
@LAYER_SETTINGS
@given(
    name=st.one_of(
        st.text(_NAME_CHARS, max_size=12), st.text(max_size=12), st.integers(), st.none(), st.binary(max_size=5)
    )
)
@example(name="x" * 99)
@example(name="x" * 100)
@example(name="abc\n")
@example(name="a!b!c")
@example(name="")
@example(name="0!")
@example(name="0!\n")
def test_layer_channel_and_group_names_are_checked(layer, loop, name):
    """Any name is either valid (the operation works) or refused with a
    TypeError, for every operation; nothing else escapes. The one valid name
    a receive refuses is another instance's process channel (``!``):
    ``ForeignChannel``, at once."""
    channel_ok = isinstance(name, str) and len(name) < 100 and p._CHANNEL_RE.fullmatch(name) is not None
    group_ok = isinstance(name, str) and len(name) < 100 and p._GROUP_RE.fullmatch(name) is not None
    operations: list[tuple[bool, Callable[[], Any]]] = [
        (channel_ok, lambda: layer.send(name, {"type": "t"})),
        (group_ok, lambda: layer.group_add(name, "layer-member")),
        (group_ok, lambda: layer.group_send(name, {"type": "t"})),
        (group_ok, lambda: layer.group_discard(name, "layer-member")),
        (channel_ok, lambda: layer.group_add("layer-group", name)),
        (channel_ok, lambda: layer.group_discard("layer-group", name)),
    ]
    for valid, operation in operations:
        if valid:
            _run(loop, operation())
        else:
            with pytest.raises(TypeError):
                _run(loop, operation())
    if channel_ok and "!" in name:
        with pytest.raises(ForeignChannel):
            _run(loop, layer.receive(name))
    elif channel_ok:
        assert _run(loop, layer.receive(name)) == {"type": "t"}
    else:
        with pytest.raises(TypeError):
            _run(loop, layer.receive(name))


@pytest.mark.timeout(60)
def test_layer_oversized_messages_raise_channels_messagetoolarge(layer, loop):
    big = {"type": "big", "data": b"\0" * (DEFAULT_MAX_MESSAGE_SIZE + 1)}
    with pytest.raises(ChannelsMessageTooLarge):
        _run(loop, layer.send("layer-big", big))
    with pytest.raises(ChannelsMessageTooLarge):
        _run(loop, layer.group_send("layer-big-group", big))
    # Just under the limit goes through.
    fits = {"type": "big", "data": b"\0" * (DEFAULT_MAX_MESSAGE_SIZE - 64)}
    _run(loop, layer.send("layer-big", fits))
    assert _run(loop, layer.receive("layer-big")) == fits


@pytest.mark.timeout(60)
def test_layer_full_channel_raises_channelfull_for_every_send_over_capacity(broker_proc, loop):
    """capacity=5: five sends fit; every further send raises ChannelFull
    (Channels' class) and the broker holds exactly five."""
    broker = broker_proc()  # its own broker: "queued" below is this channel's depth
    layer = ChannelsServerLayer(address=broker.address, embedded=False, capacity=5, **FAST)
    channel = "layer-full"
    try:
        for i in range(5):
            _run(loop, layer.send(channel, {"type": "m", "i": i}))
        outcomes = []
        for i in range(5, 25):
            try:
                _run(loop, layer.send(channel, {"type": "m", "i": i}))
                outcomes.append(f"accepted {i}")
            except ChannelsChannelFull:
                outcomes.append("ChannelFull")
        with SyncClient(broker.address, **FAST) as admin:
            queued = admin.stats()["queued"]
        received = [_run(loop, layer.receive(channel))["i"] for _ in range(queued)]
        accepted = [o for o in outcomes if o != "ChannelFull"]
        assert not accepted and queued == 5, (
            f"sends over capacity that did not raise ChannelFull: {accepted}; "
            f"the broker holds {queued} (capacity 5): received {received}"
        )
        assert received == list(range(5))
    finally:
        _run(loop, layer.close())
