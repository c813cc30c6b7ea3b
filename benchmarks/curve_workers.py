"""What runs inside the worker processes of ``benchmarks/curves.py``.

A curve has many points, and a point may need 64 processes: spawning fresh
ones for every point would cost more than the measurement (each imports
Django, Channels, channels_redis and pyzmq). So the curves use a *pool*:
each worker process imports once, then runs one *round* after another. A
round builds a fresh layer from a picklable spec (``workers.build_layer``),
runs one role, and closes the layer, so nothing carries over from one round
to the next but the imports.

The pipe, harness -> worker: ``("round", (role, spec, params))``, then
whatever that role waits for (``"go"``, ``"stop"``), and ``("quit", None)``.
Worker -> harness: ``"up"`` once, then per round ``"ready"``, ``"result"``
(or ``"error"``) and ``"closed"`` when its layer is closed. The worker
waits on the pipe with the event loop's reader, so a waiting worker costs
no CPU.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process
on the host), so the harness can hand every worker the same start time.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any, Callable, Optional

from .servers import die_with_parent
from .workers import SeqCheck, build_layer, close_layer, guarded, merge_checks, receive_into, setup_django, warm_up


class Pipe:
    """The worker's end of the pipe; ``recv`` waits without polling."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, kind: str, payload: Any = None) -> None:
        self.conn.send((kind, payload))

    async def recv_any(self, timeout: Optional[float] = None) -> tuple[str, Any]:
        conn = self.conn
        if not conn.poll():
            loop = asyncio.get_running_loop()
            readable = asyncio.Event()
            fd = conn.fileno()
            loop.add_reader(fd, readable.set)
            try:
                while not conn.poll():
                    await asyncio.wait_for(readable.wait(), timeout)
                    readable.clear()
            finally:
                loop.remove_reader(fd)
        return conn.recv()  # type: ignore[no-any-return]

    async def recv(self, kind: str, timeout: Optional[float] = None) -> Any:
        got, payload = await self.recv_any(timeout)
        if got != kind:
            raise RuntimeError(f"expected {kind!r} from the harness, got {got!r}")
        return payload


def message(seq: int, text: str) -> dict:
    return {"type": "bench.msg", "seq": seq, "text": text}


# ---------------------------------------------------------------------- roles


async def ring(layer: Any, p: dict, pipe: Pipe) -> None:
    """(a) One of N clients in a ring: it keeps ``window`` pings in flight to
    the next client's channel, and answers every ping it gets with a pong to
    the sender's channel. A ping whose pong comes back is a round trip (two
    messages through the server). Pings are sent from ``start`` until
    ``end``; then the client waits for its last pongs ("drained") and keeps
    answering others until the harness says "stop"."""
    own = await layer.new_channel()
    await warm_up(layer, own)
    pipe.send("ready", {"channel": own})
    go = await pipe.recv("go", timeout=p["timeout"])
    target, start, end = go["target"], go["start"], go["end"]
    receive, send, clock = layer.receive, layer.send, time.monotonic
    latencies: list[float] = []
    issued = outstanding = 0
    drained = asyncio.Event()

    async def ping() -> None:
        nonlocal issued, outstanding
        issued += 1
        outstanding += 1
        await send(target, {"type": "c.ping", "t": clock(), "to": own})

    async def serve() -> None:
        nonlocal outstanding
        while True:
            got = await receive(own)
            if got["type"] == "c.ping":
                await send(got["to"], {"type": "c.pong", "t": got["t"]})
                continue
            now = clock()
            outstanding -= 1
            if now <= end:
                latencies.append(now - got["t"])
                await ping()
            elif not outstanding:
                drained.set()

    await asyncio.sleep(max(0.0, start - clock()))
    server = asyncio.ensure_future(serve())
    for _ in range(p["window"]):
        await ping()
    waiter = asyncio.ensure_future(drained.wait())
    await asyncio.wait({server, waiter}, timeout=end - clock() + p["timeout"], return_when=asyncio.FIRST_COMPLETED)
    failure = None
    if server.done():
        server.result()  # raises what broke it
    elif not drained.is_set():
        failure = f"{outstanding} ping(s) unanswered {p['timeout']}s after the end"
    waiter.cancel()
    pipe.send(
        "result",
        {"round_trips": len(latencies), "issued": issued, "latencies": latencies, "failure": failure},
    )
    try:
        await pipe.recv("stop", timeout=p["timeout"] + 30)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def _members(layer: Any, group: str, k: int) -> list[str]:
    channels = [await layer.new_channel() for _ in range(k)]
    for i in range(0, k, 32):  # 32 at a time: channels_redis's pool refuses many more connections
        await asyncio.gather(*(layer.group_add(group, c) for c in channels[i : i + 32]))
    return channels


async def _receive_all(layer: Any, channels: list[str], sends: int, p: dict) -> dict:
    checks = {c: SeqCheck(sends) for c in channels}

    async def run() -> None:
        await asyncio.gather(*(receive_into(layer, c, checks[c]) for c in channels))

    failure = await guarded(run(), lambda: max(c.progress for c in checks.values()), p["timeout"], p["idle"])
    return {
        "check": merge_checks([c.summary() for c in checks.values()]),
        "last": max(c.last for c in checks.values()),
        "failure": failure,
    }


async def group_member(layer: Any, p: dict, pipe: Pipe) -> None:
    """(b) A consumer process: ``channels`` members of ``group``, each
    receiving ``sends`` messages."""
    channels = await _members(layer, p["group"], p["channels"])
    await warm_up(layer)  # after the group_adds: they are done
    # Receive once on every member first, so that the timed part is the
    # steady state: receives already waiting (and, for ours, credit granted).
    for i in range(0, len(channels), 32):
        chunk = channels[i : i + 32]
        await asyncio.gather(*(layer.send(c, {"type": "bench.warmup", "seq": -1}) for c in chunk))
        await asyncio.gather(*(layer.receive(c) for c in chunk))
    pipe.send("ready")
    cpu0 = time.process_time()
    got = await _receive_all(layer, channels, p["sends"], p)
    got["cpu"] = time.process_time() - cpu0
    pipe.send("result", got)


async def group_sender(layer: Any, p: dict, pipe: Pipe) -> None:
    """(b) The producer: ``sends`` group_sends, each timed."""
    await warm_up(layer)
    pipe.send("ready")
    await pipe.recv("go", timeout=p["timeout"])
    text = "x" * p["body"]
    times = []
    first = time.monotonic()
    for seq in range(p["sends"]):
        t0 = time.perf_counter()
        await layer.group_send(p["group"], message(seq, text))
        times.append(time.perf_counter() - t0)
    pipe.send("result", {"first": first, "times": times})


async def group_local(layer: Any, p: dict, pipe: Pipe) -> None:
    """(b) For a layer that works in one process only (the in-memory layer):
    the members and the producer in one process."""
    channels = await _members(layer, p["group"], p["channels"])
    pipe.send("ready")
    await pipe.recv("go", timeout=p["timeout"])
    receiving = asyncio.ensure_future(_receive_all(layer, channels, p["sends"], p))
    await asyncio.sleep(0)  # every receive is waiting
    cpu0 = time.process_time()
    text = "x" * p["body"]
    times = []
    first = time.monotonic()
    for seq in range(p["sends"]):
        t0 = time.perf_counter()
        await layer.group_send(p["group"], message(seq, text))
        times.append(time.perf_counter() - t0)
    got = await receiving
    pipe.send("result", {**got, "first": first, "times": times, "cpu": time.process_time() - cpu0})


async def backlog(layer: Any, p: dict, pipe: Pipe) -> None:
    """(c) Fill one channel with ``queued`` messages, then time ``measure``
    more sends onto the backlog and ``measure`` receives from its head. One
    process; the fill sends ``concurrency`` at a time, so that a layer with
    a round trip per send (channels_redis) fills in reasonable time."""
    control = await warm_up(layer)
    channel = f"bench.backlog.{p['tag']}"
    queued, measure = p["queued"], p["measure"]
    text = "b" * p["body"]
    send, receive, step = layer.send, layer.receive, p["concurrency"]
    pipe.send("ready")
    await pipe.recv("go", timeout=p["timeout"])
    t0 = time.monotonic()
    for start in range(0, queued, step):
        await asyncio.gather(*(send(channel, message(i, text)) for i in range(start, min(start + step, queued))))
    await warm_up(layer, control)  # one more round trip: the server has taken every send
    t1 = time.monotonic()
    for i in range(queued, queued + measure):
        await send(channel, message(i, text))
    await warm_up(layer, control)
    t2 = time.monotonic()
    # The fill sent many at a time, so the head may be out of sequence order
    # (the harness checks for losses, duplicates and garbage only).
    check = SeqCheck(queued + measure)

    async def drain() -> None:
        for _ in range(measure):
            check.add(await receive(channel))

    failure = await guarded(drain(), lambda: check.progress, p["timeout"], p["idle"])
    t3 = check.last or time.monotonic()
    pipe.send(
        "result",
        {"fill": t1 - t0, "send": t2 - t1, "receive": t3 - t2, "check": check.summary(), "failure": failure},
    )


ROLES: dict[str, Callable[[Any, dict, Pipe], Any]] = {
    "ring": ring,
    "group_member": group_member,
    "group_sender": group_sender,
    "group_local": group_local,
    "backlog": backlog,
}


# ---------------------------------------------------------------------- main


async def _serve(conn: Any) -> None:
    pipe = Pipe(conn)
    pipe.send("up")
    while True:
        kind, payload = await pipe.recv_any()
        if kind == "quit":
            return
        if kind != "round":
            continue  # a late "stop" or "go" for a round that failed
        role, spec, params = payload
        layer = None
        try:
            layer = build_layer(spec)
            await ROLES[role](layer, params, pipe)
        except Exception as exc:  # reported to the harness, which fails the point
            pipe.send("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        finally:
            if layer is not None:
                try:
                    await asyncio.wait_for(close_layer(layer), 10)
                except Exception:
                    pass
            pipe.send("closed")


def pool_main(conn: Any) -> None:
    """Entry point of every pool worker."""
    die_with_parent()
    try:
        setup_django()
        asyncio.run(_serve(conn))
    except BaseException as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except Exception:
            pass
    finally:
        conn.close()
