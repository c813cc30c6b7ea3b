#!/usr/bin/env python
"""Micro-benchmarks of the pure broker core, no sockets: ``make bench-core``.

Each case is timed timeit-style (the best of a few repeats of a loop sized
to take about 0.1 s), so a hot-path change is judged in seconds. Prints a
table and writes benchmarks/results/core-latest.md (``--out`` elsewhere).

The cases: encode and decode of a header; ``Broker.handle`` of a Send with
1, 100 and 1,000 bodies to a channel with a subscriber (its replies and
deliveries drained, as the shell would); a GroupSend to 500 members over 2
peers; ``ChannelQueue.deliver`` of 1,000 queued messages into a sink.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

from django_message_broker import protocol as p  # noqa: E402
from django_message_broker.server.broker import Broker  # noqa: E402
from django_message_broker.server.data_message import DataMessage  # noqa: E402
from django_message_broker.server.server_queue import ChannelQueue, Endpoint  # noqa: E402

A, B, C = b"peer-a", b"peer-b", b"peer-c"
BODY = b"x" * 100


class _NullRouter:
    """A ROUTER that accepts every frame (for a core that still sends itself)."""

    def send(self, frame: Any, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        pass


def _broker() -> Any:
    """A broker at an unchanging time, and a function that takes its output."""
    if hasattr(Broker, "data_to_send"):
        broker = Broker(clock=lambda: 100.0, max_memory=1 << 40)
        return broker, broker.data_to_send
    broker = Broker(_NullRouter(), clock=lambda: 100.0, max_memory=1 << 40)  # the core before sans-IO
    return broker, lambda: None


def _subscribed(credit: int = p.MAX_CREDIT) -> tuple[Any, Callable[[], Any]]:
    broker, drain = _broker()
    for ident in (A, B):
        broker.handle([ident, p.encode(p.Hello(1, ident.decode(), 1.0))], 100.0)
    broker.handle([B, p.encode(p.Subscribe(0, "chat", credit))], 100.0)
    drain()
    return broker, drain


def case_encode() -> Callable[[], None]:
    msg = p.Send(7, "chat.room-1", 60.0, 100, True)
    encode = p.encode
    return lambda: encode(msg)


def case_decode() -> Callable[[], None]:
    header = p.encode(p.Send(7, "chat.room-1", 60.0, 100, True))
    decode = p.decode_command
    return lambda: decode(header)


def case_send(n: int) -> Callable[[], None]:
    broker, drain = _subscribed()
    frames = [A, p.encode(p.Send(1, "chat", 60.0, 1 << 30, True)), *([BODY] * n)]
    queue = broker.queues["chat"]
    endpoint = broker.clients[B].endpoints["chat"]
    handle = broker.handle

    def run() -> None:
        handle(frames, 100.0)
        drain()
        # Consumed at once: credit and held stay level across iterations.
        queue.release(endpoint, n)
        endpoint.credit = p.MAX_CREDIT

    return run


def case_group_send(members: int = 500) -> Callable[[], None]:
    broker, drain = _broker()
    for ident in (A, B, C):
        broker.handle([ident, p.encode(p.Hello(1, ident.decode(), 1.0))], 100.0)
    endpoints = []
    for i in range(members):
        ident = B if i % 2 else C
        channel = f"chat!{ident.decode()}.{i}"
        broker.handle([A, p.encode(p.GroupAdd(1, "room", channel, 86400.0))], 100.0)
        broker.handle([ident, p.encode(p.Subscribe(0, channel, p.MAX_CREDIT))], 100.0)
        endpoints.append((broker.queues[channel], broker.clients[ident].endpoints[channel]))
    drain()
    frames = [A, p.encode(p.GroupSend(2, "room", 60.0, 1 << 20, [])), BODY]
    handle = broker.handle

    def run() -> None:
        handle(frames, 100.0)
        drain()
        for queue, endpoint in endpoints:
            queue.release(endpoint, 1)
            endpoint.credit = p.MAX_CREDIT

    return run


class _Sink:
    """Takes runs of deliveries and drops them (the broker's Outbox stands here)."""

    def defer(self, queue: ChannelQueue, endpoint: Endpoint, messages: list) -> None:
        pass


def case_deliver(n: int = 1000) -> Callable[[], None]:
    sink = _Sink()
    queue = ChannelQueue(b"chat")
    endpoint = Endpoint(sink, [B], b"chat")
    queue.subscribe(endpoint)
    messages = [DataMessage(BODY) for _ in range(n)]
    takes_sink = "sink" in ChannelQueue.deliver.__code__.co_varnames

    def run() -> None:
        for m in messages:
            queue.push(m, 60)
        if takes_sink:
            queue.deliver(sink=sink)
        else:
            queue.deliver()  # the Outbox as the endpoint's socket (duck-typed ``defer``)
        queue.release(endpoint, n)

    return run


CASES: list[tuple[str, Callable[[], Callable[[], None]], int]] = [
    # (name, factory, items per call: bodies or members, for the per-item column)
    ("encode a Send header", case_encode, 1),
    ("decode a Send header", case_decode, 1),
    ("handle Send, 1 body", lambda: case_send(1), 1),
    ("handle Send, 100 bodies", lambda: case_send(100), 100),
    ("handle Send, 1,000 bodies", lambda: case_send(1000), 1000),
    ("handle GroupSend, 500 members / 2 peers", case_group_send, 500),
    ("ChannelQueue.deliver, 1,000 messages", case_deliver, 1000),
]


def measure(run: Callable[[], None], target: float = 0.1, repeat: int = 5) -> float:
    """Seconds per call: the best of ``repeat`` loops of about ``target`` s."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            run()
        elapsed = time.perf_counter() - start
        if elapsed >= target / 5 or loops >= 1 << 20:
            break
        loops *= 4
    loops = max(1, int(loops * target / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(loops):
            run()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def _fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core-latest.md"))
    parser.add_argument("--label", default="", help="a note for the report's heading (a commit, 'before')")
    args = parser.parse_args(argv)
    rows = []
    for name, factory, items in CASES:
        seconds = measure(factory())
        rows.append((name, seconds, items))
        print(f"{name:<42} {_fmt(seconds):>12} {_fmt(seconds / items):>12} per item", flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Pure-core micro-benchmarks ({stamp}{', ' + args.label if args.label else ''})",
        "",
        f"`make bench-core` (benchmarks/core.py): no sockets, best of 5. Python {platform.python_version()}, "
        f"{platform.machine()}.",
        "",
        "| case | per call | per body or member |",
        "|---|---:|---:|",
        *(f"| {name} | {_fmt(s)} | {_fmt(s / items)} |" for name, s, items in rows),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
