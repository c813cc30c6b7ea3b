"""Bad input before the protocol starts: garbage at the TCP level against a
CURVE broker (``--secret-key`` and ``--authorized-keys``).

Raw TCP peers send random bytes, truncated ZMTP greetings, whole greetings
for the NULL, PLAIN, CURVE or an unknown mechanism followed by garbage,
CURVE HELLO commands of the right shape with nonsense keys and boxes, and
bit-flipped greetings; some hang up at once, some linger half-open (a pool
of at most ``OPEN_POOL``). Meanwhile a CURVE client with an authorized key
does round trips. Oracles: the broker stays up and logs no traceback, every
round trip of the good client succeeds within ``LATENCY_BOUND``, and
afterwards its RSS and open file descriptors are back near where they were.

Inputs come from a seeded ``random.Random`` (``DMB_FUZZ_SEED`` to replay).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import pytest
from dmb_reliability import GoodClient, wait_for

from django_message_broker import SyncClient
from django_message_broker.keys import create_keypair

SEED = int(os.environ.get("DMB_FUZZ_SEED", "20240611"))
CONNECTIONS = 30_000
OPEN_POOL = 64
LATENCY_BOUND = 1.0  # seconds, worst good-client round trip
MiB = 1 << 20
RSS_SLACK = 20 * MiB
FD_SLACK = 8

MECHANISMS = [b"NULL", b"PLAIN", b"CURVE", b"GSSAPI", b"", b"CURVE\x00X", os.urandom(20)]


def greeting(rng: random.Random, mechanism: bytes = b"CURVE", major: int = 3, minor: int = 0) -> bytes:
    """A ZMTP 3.x greeting (64 bytes): signature, version, mechanism, as-server, filler."""
    return (
        b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([major, minor]) + mechanism[:20].ljust(20, b"\x00")
        + bytes([rng.choice([0, 0, 1, 255])]) + b"\x00" * 31
    )  # fmt: skip


def command(name: bytes, body: bytes, long: bool = False) -> bytes:
    data = bytes([len(name)]) + name + body
    if long or len(data) > 255:
        return b"\x06" + len(data).to_bytes(8, "big") + data
    return b"\x04" + bytes([len(data)]) + data


def curve_hello(rng: random.Random) -> bytes:
    """A CURVE HELLO of the right shape: version, padding, a random
    'transient key', nonce and 'signature box' (garbage to the broker)."""
    body = bytes([1, 0]) + b"\x00" * 72 + rng.randbytes(32) + rng.randbytes(8) + rng.randbytes(80)
    return command(b"HELLO", body)


def gen_random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([1, 10, 64, 300, 4096]))


def gen_truncated_greeting(rng: random.Random) -> bytes:
    return greeting(rng, rng.choice(MECHANISMS))[: rng.randrange(1, 64)]


def gen_greeting_then_garbage(rng: random.Random) -> bytes:
    major = rng.choice([3, 3, 3, 1, 2, 4, 255])
    tail = rng.choice(
        [
            rng.randbytes(rng.randrange(1, 512)),
            command(b"READY", rng.randbytes(rng.randrange(0, 100))),
            command(b"HELLO", rng.randbytes(rng.randrange(0, 300))),
            command(b"ERROR", b"\x05nope!"),
            b"\x06" + (2**63 - 1).to_bytes(8, "big") + b"x" * 10,  # a huge length, then nothing
            b"\x04\xff" + rng.randbytes(10),  # a length longer than what follows
        ]
    )
    return greeting(rng, rng.choice(MECHANISMS), major, rng.choice([0, 1])) + tail


def gen_curve_hello(rng: random.Random) -> bytes:
    data = greeting(rng, b"CURVE") + curve_hello(rng)
    if rng.random() < 0.3:  # and what a client would send next, as garbage
        data += command(b"INITIATE", rng.randbytes(rng.randrange(100, 400)))
    return data


def gen_flipped_greeting(rng: random.Random) -> bytes:
    data = bytearray(greeting(rng, b"CURVE") + curve_hello(rng))
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


GENERATORS: list[Callable[[random.Random], bytes]] = [
    gen_random_bytes,
    gen_truncated_greeting,
    gen_greeting_then_garbage,
    gen_curve_hello,
    gen_flipped_greeting,
]


def _poke(host: str, port: int, data: bytes, rng: random.Random, pool: list[socket.socket]) -> None:
    sock = socket.create_connection((host, port), timeout=2.0)
    try:
        sock.sendall(data)
    except OSError:  # the broker hung up first: that is allowed
        sock.close()
        return
    if rng.random() < 0.1:  # linger half-open for a while
        pool.append(sock)
        if len(pool) > OPEN_POOL:
            pool.pop(0).close()
        return
    if rng.random() < 0.2:  # read what the broker answers, if anything
        sock.settimeout(0.005)
        try:
            sock.recv(4096)
        except OSError:
            pass
    if rng.random() < 0.5:  # a reset instead of a clean close
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@pytest.mark.timeout(120)
def test_garbage_before_and_instead_of_a_curve_handshake(broker_proc, tmp_path: Path):
    broker_public, broker_secret = create_keypair("broker", tmp_path)
    good_public, good_secret = create_keypair("good", tmp_path)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(good_public, authorized)
    broker = broker_proc(
        "tcp://127.0.0.1:0",
        "--secret-key",
        str(broker_secret),
        "--authorized-keys",
        str(authorized),
        "--log-level",
        "WARNING",
    )
    url = urlparse(broker.address)
    host, port = url.hostname or "127.0.0.1", url.port or 0
    rng = random.Random(SEED)
    print(f"handshake fuzz seed {SEED}: replay with DMB_FUZZ_SEED={SEED}")
    with SyncClient(broker.address, server_key=str(broker_public), client_key=str(good_secret), timeout=5.0) as warm:
        warm.send("warm-up", b"x")
        assert warm.receive("warm-up", timeout=10) == b"x"
    baseline_rss, baseline_fds = broker.rss(), broker.num_fds()
    pool: list[socket.socket] = []
    peak_rss = baseline_rss
    started = time.monotonic()
    curve_client = SyncClient(
        broker.address, server_key=str(broker_public), client_key=str(good_secret), timeout=5.0, heartbeat=0.5
    )
    with GoodClient(curve_client, "curve-good", pause=0.01) as good:
        for i in range(CONNECTIONS):
            _poke(host, port, GENERATORS[i % len(GENERATORS)](rng), rng, pool)
            if i % 500 == 0:
                assert broker.alive(), f"the broker died (seed {SEED}):\n{broker.log()[-3000:]}"
                peak_rss = max(peak_rss, broker.rss())
        elapsed = time.monotonic() - started
        for sock in pool:
            sock.close()
        after = len(good.latencies)  # the good client's round trips after the last input too
        wait_for(lambda: len(good.latencies) >= after + 5, 10, "round trips after the last input")
    assert broker.alive(), broker.log()[-3000:]
    assert not good.errors, f"good CURVE client failed: {good.errors[:5]}"
    assert len(good.latencies) >= 10, f"only {len(good.latencies)} round trips"
    worst = max(good.latencies)
    assert worst < LATENCY_BOUND, f"worst good-client round trip {worst:.3f}s"
    assert "Traceback" not in broker.log(), broker.log()[-3000:]
    rss = wait_for(lambda: broker.rss() if broker.rss() < baseline_rss + RSS_SLACK else 0, 15, "RSS near baseline")
    fds = wait_for(lambda: broker.num_fds() if broker.num_fds() <= baseline_fds + FD_SLACK else 0, 15, "fds back")
    with SyncClient(broker.address, server_key=str(broker_public), client_key=str(good_secret), timeout=5.0) as after:
        after.send("after-fuzz", b"still here")
        assert after.receive("after-fuzz", timeout=10) == b"still here"
    print(
        "handshake fuzz figures:",
        {
            "connections": CONNECTIONS,
            "seconds": round(elapsed, 2),
            "good_round_trips": len(good.latencies),
            "good_worst_latency_ms": round(worst * 1000, 1),
            "rss_baseline_mb": round(baseline_rss / MiB, 1),
            "rss_peak_mb": round(peak_rss / MiB, 1),
            "rss_after_mb": round(rss / MiB, 1),
            "fds_baseline": baseline_fds,
            "fds_after": fds,
        },
    )
