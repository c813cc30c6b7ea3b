#!/usr/bin/env python
"""Micro-benchmarks of the pure broker core, no sockets: ``make bench-core``.

Each case is timed timeit-style (the best of a few repeats of a loop sized
to take about 0.1 s), so a hot-path change is judged in seconds. Prints a
table and writes benchmarks/results/core-latest.md (``--out`` elsewhere).

The cases: encode and decode of a header; ``Broker.handle`` of a Send with
1, 100 and 1,000 bodies to a channel with a subscriber (its replies and
deliveries drained, as the shell would); a GroupSend to 500 members over 2
peers, with and without shared bodies (``Deliver.body_of``), and to 10,000
(the cost per member should not grow with the group); the client state
taking a group_send's Deliver to 250 and 5,000 members of one process, each
member's message taken and decoded; ``ChannelQueue.deliver`` of 1,000
queued messages into a sink.
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


def _hello(ident: bytes, shared: bool) -> bytes:
    """A Hello; ``shared``: one that takes shared bodies, where the core knows them."""
    if shared and "shared_bodies" in p.Hello.__struct_fields__:
        return p.encode(p.Hello(1, ident.decode(), 1.0, True))
    return p.encode(p.Hello(1, ident.decode(), 1.0))


def case_group_send(members: int = 500, shared: bool = False) -> Callable[[], None]:
    broker, drain = _broker()
    for ident in (A, B, C):
        broker.handle([ident, _hello(ident, shared)], 100.0)
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


def case_client_fanout(members: int = 250) -> Callable[[], None]:
    """The receiving side of a group_send to ``members`` channels of one
    process: the client state takes the Deliver, each member's receive takes
    its message and the layer decodes it. With shared bodies (where the
    client has them) the Deliver brings one body and it is decoded once."""
    from django_message_broker.client import _state
    from django_message_broker.messages import decode_message, encode_message

    body = encode_message({"type": "chat.message", "text": "x" * 100})
    channels = [f"chat!c.{i}" for i in range(members)]
    ttls = [60.0] * members
    state = _state.ClientState(prefetch=8, process_prefetch=8, idle_return=60.0)
    share = getattr(_state, "share_bodies", None)

    def waiter(_state: Any) -> Any:
        raise AssertionError("every message is buffered")

    if share is not None:
        from django_message_broker.messages import decode_shared

        def run() -> None:
            bodies, slots = share([bytes(memoryview(body))], [0] * members)  # the driver copies each frame
            state.deliver(channels, bodies, ttls, 100.0, slots)
            for channel in channels:
                item, _, _ = state.take(channel, 100.0, waiter, False)
                decode_shared(item[0], item[2])

    else:

        def run() -> None:
            state.deliver(channels, [bytes(memoryview(body)) for _ in channels], ttls, 100.0)
            for channel in channels:
                item, _, _ = state.take(channel, 100.0, waiter, False)
                decode_message(item[0])

    return run


def case_fanout_over_zmq(members: int = 500) -> Callable[[], None]:
    """A GroupSend to ``members`` channels of one receiving process, the
    whole way in one thread: the broker core decides, its shell's send loop
    (``server._send_all``) writes to a ROUTER, a DEALER reads every frame
    (as the client's I/O thread does), the client state takes the Deliver,
    and each member's message is taken and decoded as the layer does. With
    shared bodies where both sides have them. Over inproc ZeroMQ: no
    scheduler in the measurement, so a fan-out change shows in seconds."""
    import zmq

    from django_message_broker import messages as m
    from django_message_broker.client import _state
    from django_message_broker.server.server import _send_all

    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    address = f"inproc://fanout-{id(router)}"
    router.bind(address)
    dealer.setsockopt(zmq.ROUTING_ID, B)
    dealer.connect(address)
    broker, _ = _broker()
    broker.handle([A, _hello(A, False)], 100.0)
    broker.handle([B, _hello(B, True)], 100.0)
    channels = [f"chat!{B.decode()}.{i}" for i in range(members)]
    queues = []
    for channel in channels:
        broker.handle([A, p.encode(p.GroupAdd(1, "room", channel, 86400.0))], 100.0)
        broker.handle([B, p.encode(p.Subscribe(0, channel, p.MAX_CREDIT))], 100.0)
        queues.append((broker.queues[channel], broker.clients[B].endpoints[channel]))
    broker.data_to_send()
    body = m.encode_message({"type": "chat.message", "text": "x" * 100})
    frames = [A, p.encode(p.GroupSend(2, "room", 60.0, 1 << 20, [])), body]
    state = _state.ClientState(prefetch=8, process_prefetch=8, idle_return=60.0)
    share = getattr(_state, "share_bodies", None)
    decode_shared = getattr(m, "decode_shared", None)
    recv = dealer.recv

    def waiter(_state: Any) -> Any:
        raise AssertionError("every message is buffered")

    def run() -> None:
        broker.handle(frames, 100.0)
        _send_all(router, broker)
        got = 0
        while got < members:
            frame = recv(copy=False)
            parts = [frame]
            while frame.more:
                frame = recv(copy=False)
                parts.append(frame)
            msg = p.decode_to_client(parts[0].buffer)
            if not isinstance(msg, p.Deliver):
                continue
            bodies = [f.bytes for f in parts[1:]]
            body_of = getattr(msg, "body_of", None)
            if body_of and share is not None:
                bodies, slots = share(bodies, body_of)
                state.deliver(msg.channels or [msg.channel] * len(bodies), bodies, msg.ttls, 100.0, slots)
            else:
                state.deliver(msg.channels or [msg.channel] * len(bodies), bodies, msg.ttls, 100.0)
            got += len(bodies)
        for channel in channels:
            item, _, _ = state.take(channel, 100.0, waiter, False)
            if decode_shared is not None:
                decode_shared(item[0], item[2])
            else:
                m.decode_message(item[0])
        for queue, endpoint in queues:
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
    ("handle GroupSend, 500 members / 2 peers, shared bodies", lambda: case_group_send(shared=True), 500),
    (
        "handle GroupSend, 10,000 members / 2 peers, shared bodies",
        lambda: case_group_send(10_000, shared=True),
        10_000,
    ),
    ("client: a group_send's Deliver to 250 members, taken and decoded", case_client_fanout, 250),
    (
        "client: a group_send's Deliver to 5,000 members, taken and decoded",
        lambda: case_client_fanout(5000),
        5000,
    ),
    ("fan-out over inproc ZeroMQ: 500 members of one process, end to end", case_fanout_over_zmq, 500),
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
