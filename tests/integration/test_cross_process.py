"""Three processes: the broker (``python -m django_message_broker serve``),
a producer (SyncClient) and a consumer (AsyncClient) exchanging 10,000
messages: none lost, duplicated or reordered."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from django_message_broker.embedded import probe
from helpers import free_port, wait_for

N = 10_000

PRODUCER = textwrap.dedent(
    """
    import sys
    from django_message_broker import SyncClient

    address, channel, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with SyncClient(address, timeout=10) as client:
        for i in range(n):
            client.send(channel, b"%d" % i, capacity=n + 1)
        client.stats()  # a round trip: every send before it has reached the broker
    print("sent", n, flush=True)
    """
)

CONSUMER = textwrap.dedent(
    """
    import asyncio, json, sys
    from django_message_broker import AsyncClient

    address, channel, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main():
        async with AsyncClient(address, timeout=10) as client:
            print("ready", flush=True)
            got = [int(await asyncio.wait_for(client.receive(channel), 20)) for _ in range(n)]
            try:
                extra = (await asyncio.wait_for(client.receive(channel), 0.5)).decode()
            except asyncio.TimeoutError:
                extra = None
        return got, extra

    got, extra = asyncio.run(main())
    print(json.dumps({"got": got, "extra": extra}), flush=True)
    """
)


@pytest.fixture
def broker_process() -> Iterator[tuple[subprocess.Popen, str]]:
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "django_message_broker", "serve", "--bind", address, "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not probe(address, 0.2):
            assert proc.poll() is None, f"broker exited: {proc.communicate()}"
            assert time.monotonic() < deadline, "broker did not answer"
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_two_processes_exchange_10000_messages_in_order(broker_process, tmp_path: Path):
    proc, address = broker_process
    (tmp_path / "producer.py").write_text(PRODUCER)
    (tmp_path / "consumer.py").write_text(CONSUMER)
    args = [address, "xproc.channel", str(N)]
    consumer = subprocess.Popen(
        [sys.executable, str(tmp_path / "consumer.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert consumer.stdout is not None
    assert consumer.stdout.readline().strip() == "ready"  # the consumer is up
    producer = subprocess.run(
        [sys.executable, str(tmp_path / "producer.py"), *args], capture_output=True, text=True, timeout=45
    )
    assert producer.returncode == 0, producer.stderr
    assert producer.stdout.strip() == f"sent {N}"
    out, err = consumer.communicate(timeout=45)
    assert consumer.returncode == 0, err
    result = json.loads(out)
    got = result["got"]
    assert len(got) == N
    assert len(set(got)) == N, "duplicates"
    assert set(got) == set(range(N)), "lost messages"
    assert got == list(range(N)), "reordered"
    assert result["extra"] is None, f"an extra message arrived: {result['extra']!r}"

    # SIGTERM: the broker stops promptly and cleanly.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert not probe(address, 0.2)


RECEIVER = textwrap.dedent(
    """
    import sys
    from django_message_broker import SyncClient

    address, channel = sys.argv[1], sys.argv[2]
    with SyncClient(address, timeout=10) as client:
        for line in sys.stdin:  # one receive per line; the parent says when
            if line.strip() != "receive":
                break
            print(client.receive(channel, timeout=10).decode(), flush=True)
    """
)


def in_channel(client: object) -> int:
    """What counts against capacity at the broker: queued plus held."""
    stats = client.stats()  # type: ignore[attr-defined]
    return int(stats["queued"] + stats["held"])


def test_capacity_counts_what_another_process_prefetched(broker_process, tmp_path: Path):
    """Messages delivered to another process's prefetch buffer and not yet
    received there still count: the sender's ChannelFull comes at exactly
    ``capacity``, right after that process received from the channel (once
    its report of what it took has reached the broker: it goes out within
    one wake of its I/O thread, on its own connection)."""
    from django_message_broker import QueueFull, SyncClient

    _, address = broker_process
    (tmp_path / "receiver.py").write_text(RECEIVER)
    receiver = subprocess.Popen(
        [sys.executable, str(tmp_path / "receiver.py"), address, "xproc.capacity"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdin is not None and receiver.stdout is not None
    try:
        with SyncClient(address, timeout=10) as sender:
            sender.send("xproc.capacity", b"warm", capacity=3)
            receiver.stdin.write("receive\n")
            receiver.stdin.flush()
            assert receiver.stdout.readline().strip() == "warm"
            # The receiver's report of what it took travels on its own
            # connection; the broker's ROUTER keeps no order across
            # connections, so wait (microseconds, usually) until it counted.
            wait_for(lambda: in_channel(sender) == 0, 5, "the receiver's report of 'warm'")
            # The receiver now has credit: what follows is delivered to its
            # buffer at once, yet still counts against the capacity.
            for n in range(3):
                sender.send("xproc.capacity", b"%d" % n, capacity=3)
            with pytest.raises(QueueFull):
                sender.send("xproc.capacity", b"3", capacity=3)
            receiver.stdin.write("receive\n")
            receiver.stdin.flush()
            assert receiver.stdout.readline().strip() == "0"
            wait_for(lambda: in_channel(sender) == 2, 5, "the receiver's report of '0'")
            sender.send("xproc.capacity", b"4", capacity=3)  # one received: room for one
            with pytest.raises(QueueFull):
                sender.send("xproc.capacity", b"5", capacity=3)
            assert in_channel(sender) == 3
    finally:
        receiver.stdin.close()
        receiver.wait(10)
