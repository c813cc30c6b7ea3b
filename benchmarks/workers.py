"""What runs inside the worker processes.

Every worker is a fresh ``spawn`` process: it builds its own layer from a
picklable spec (``build_layer``), talks to the harness over a
``multiprocessing`` pipe (``Control``: "ready", "done", "result", "error"
up; "go", "drain", "finish" down), and never shares a layer with another
process. Messages carry sequence numbers; receivers check them with
``SeqCheck`` (lost, duplicated, out of order, malformed).

Times are ``time.monotonic()``: on Linux it is CLOCK_MONOTONIC, one clock for
every process on the host, so a producer's first send and a consumer's last
receive can be subtracted.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import time
import traceback
from typing import Any, Callable, Optional

from .servers import die_with_parent

# --------------------------------------------------------------------------- layer


def setup_django() -> None:
    """Channels layers may read settings; give them an empty configuration."""
    try:
        from django.conf import settings

        import django
    except ImportError:
        return
    if not settings.configured:
        settings.configure(INSTALLED_APPS=[], USE_TZ=True)
        django.setup()


def build_layer(spec: dict) -> Any:
    module_name, _, cls_name = spec["path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec["kwargs"])


async def close_layer(layer: Any) -> None:
    for name in ("close", "close_pools"):
        method = getattr(type(layer), name, None)
        if method is None:
            continue
        result = getattr(layer, name)()
        if inspect.isawaitable(result):
            await result
        return


# ------------------------------------------------------------------- plumbing


class Control:
    """The worker's end of the pipe to the harness."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, kind: str, payload: Any = None) -> None:
        self.conn.send((kind, payload))

    def recv_blocking(self, kind: str, timeout: float = 120.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the harness sent no {kind!r} within {timeout}s")
        got, payload = self.conn.recv()
        if got != kind:
            raise RuntimeError(f"expected {kind!r} from the harness, got {got!r}")
        return payload

    async def recv(self, kind: str, timeout: float = 120.0) -> Any:
        """Wait for a message without blocking the loop (polled: only used
        outside timed sections)."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the harness sent no {kind!r} within {timeout}s")
            await asyncio.sleep(0.002)
        return self.recv_blocking(kind, 0)


class SeqCheck:
    """Which of ``0..n-1`` arrived, once each and in order."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.unique = self.dups = self.out_of_order = self.bad = 0
        self.max_seq = -1
        self.first = self.last = 0.0
        self.progress = 0.0  # when the latest message came; 0: none yet

    def add(self, message: Any, check: Optional[Callable[[Any], bool]] = None) -> None:
        now = time.monotonic()
        if not self.first:
            self.first = now
        self.last = self.progress = now
        try:
            seq = message["seq"]
        except (KeyError, TypeError):
            self.bad += 1
            return
        if not isinstance(seq, int) or not 0 <= seq < self.n or (check is not None and not check(message)):
            self.bad += 1
            return
        if self.seen[seq]:
            self.dups += 1
            return
        self.seen[seq] = 1
        self.unique += 1
        if seq < self.max_seq:
            self.out_of_order += 1
        else:
            self.max_seq = seq

    @property
    def complete(self) -> bool:
        return self.unique >= self.n

    def ok(self) -> bool:
        return self.unique == self.n and not (self.dups or self.out_of_order or self.bad)

    def summary(self) -> dict:
        return {
            "expected": self.n,
            "received": self.unique,
            "missing": self.n - self.unique,
            "duplicates": self.dups,
            "out_of_order": self.out_of_order,
            "malformed": self.bad,
        }


def merge_checks(checks: list[dict]) -> dict:
    total: dict = {}
    for check in checks:
        for key, value in check.items():
            total[key] = total.get(key, 0) + value
    return total


async def guarded(coro: Any, progress: Callable[[], float], timeout: float, idle: float) -> Optional[str]:
    """Run ``coro``; cancel it after ``timeout`` seconds, or after ``idle``
    seconds without progress once there was some (before the first message
    only ``timeout`` applies: the sender may still be starting). Returns
    None, or why it gave up."""
    task = asyncio.ensure_future(coro)
    start = time.monotonic()
    reason = None
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if task.done():
            break
        now = time.monotonic()
        if now - start > timeout:
            reason = "timeout"
        elif progress() and now - progress() > idle:
            reason = "stalled"
        if reason:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return f"{reason} after {now - start:.1f}s"
    task.result()
    return None


async def receive_into(
    layer: Any, channel: str, check: SeqCheck, validate: Optional[Callable[[Any], bool]] = None
) -> None:
    receive = layer.receive
    while not check.complete:
        check.add(await receive(channel), validate)


async def tail(layer: Any, checks: dict[str, Callable[[Any], None]], seconds: float = 0.2) -> None:
    """Catch late duplicates for a moment after the run (not timed)."""

    async def one(channel: str, check: Callable[[Any], None]) -> None:
        while True:
            check(await layer.receive(channel))

    tasks = [asyncio.ensure_future(one(c, check)) for c, check in checks.items()]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def warm_up(layer: Any, channel: Optional[str] = None) -> str:
    """Connect, and prove the receive path works: a message to ourselves.
    For pub/sub layers it also proves the subscription is live."""
    if channel is None:
        channel = await layer.new_channel()
    await layer.send(channel, {"type": "bench.warmup", "seq": -1})
    message = await asyncio.wait_for(layer.receive(channel), 30)
    if message.get("type") != "bench.warmup":
        raise RuntimeError(f"warm-up got {message!r}")
    return channel


def small_message(seq: int, text: str) -> dict:
    return {"type": "bench.msg", "seq": seq, "text": text}


# ---------------------------------------------------------------------- roles


async def consumer(layer: Any, params: dict, ctl: Control) -> None:
    """Scenarios 1 and 5: receive ``n`` messages on a fresh channel."""
    channel = await layer.new_channel()
    await warm_up(layer, channel)
    size = params.get("size")
    validate = None
    if size:
        head = params["head"]

        def validate(message: Any) -> bool:
            body = message.get("body")
            return isinstance(body, bytes) and len(body) == size and body[:16] == head

    check = SeqCheck(params["n"])
    ctl.send("ready", {"channel": channel})
    cpu0 = time.process_time()
    failure = await guarded(
        receive_into(layer, channel, check, validate), lambda: check.progress, params["timeout"], params["idle"]
    )
    cpu = time.process_time() - cpu0
    ctl.send("done", {"last": check.last})
    if failure is None:
        await tail(layer, {channel: lambda m: check.add(m, validate)})
    ctl.send("result", {"check": check.summary(), "last": check.last, "failure": failure, "cpu": cpu})
    await ctl.recv("finish")
    await close_layer(layer)


async def producer(layer: Any, params: dict, ctl: Control) -> None:
    await warm_up(layer)
    ctl.send("ready")
    target = (await ctl.recv("go"))["channel"]
    n = params["n"]
    if params.get("size"):
        body = params["head"] + os.urandom(params["size"] - 16)
        messages = [{"type": "bench.large", "seq": i, "body": body} for i in range(n)]
    else:
        text = "x" * params["body"]
        messages = [small_message(i, text) for i in range(n)]
    send = layer.send
    cpu0 = time.process_time()
    first = time.monotonic()
    for message in messages:
        await send(target, message)
    sent = time.monotonic()
    ctl.send("result", {"first": first, "sent": sent, "cpu": time.process_time() - cpu0})
    await ctl.recv("finish")
    await close_layer(layer)


async def ponger(layer: Any, params: dict, ctl: Control) -> None:
    channel = await layer.new_channel()
    await warm_up(layer, channel)
    ctl.send("ready", {"channel": channel})
    receive, send = layer.receive, layer.send
    deadline = time.monotonic() + params["timeout"] + 30
    answered = 0
    while time.monotonic() < deadline:
        message = await receive(channel)
        if message.get("type") == "bench.stop":
            break
        await send(message["reply_to"], {"type": "bench.pong", "seq": message["seq"]})
        answered += 1
    ctl.send("result", {"answered": answered})
    await ctl.recv("finish")
    await close_layer(layer)


async def pinger(layer: Any, params: dict, ctl: Control) -> None:
    own = await layer.new_channel()
    await warm_up(layer, own)
    ctl.send("ready")
    target = (await ctl.recv("go"))["channel"]
    warm, n = params["warmup"], params["n"]
    latencies: list[float] = []
    check = SeqCheck(warm + n)
    receive, send = layer.receive, layer.send

    async def run() -> None:
        for seq in range(warm + n):
            start = time.perf_counter()
            await send(target, {"type": "bench.ping", "seq": seq, "reply_to": own})
            reply = await receive(own)
            elapsed = time.perf_counter() - start
            check.add(reply)
            if reply.get("seq") != seq:
                raise RuntimeError(f"round trip {seq} got the reply {reply.get('seq')!r}")
            if seq >= warm:
                latencies.append(elapsed)

    failure = await guarded(run(), lambda: check.progress, params["timeout"], params["idle"])
    await send(target, {"type": "bench.stop"})
    ctl.send("result", {"latencies": latencies, "check": check.summary(), "failure": failure})
    await ctl.recv("finish")
    await close_layer(layer)


async def group_consumer(layer: Any, params: dict, ctl: Control) -> None:
    group, k, m = params["group"], params["channels"], params["sends"]
    channels = [await layer.new_channel() for _ in range(k)]
    for channel in channels:
        await layer.group_add(group, channel)
    await warm_up(layer)  # subscribed after the group: proves the group subscription too
    checks = {channel: SeqCheck(m) for channel in channels}
    ctl.send("ready")

    async def run() -> None:
        await asyncio.gather(*(receive_into(layer, c, checks[c]) for c in channels))

    def progress() -> float:
        return max(c.progress for c in checks.values())

    cpu0 = time.process_time()
    failure = await guarded(run(), progress, params["timeout"], params["idle"])
    cpu = time.process_time() - cpu0
    last = max(c.last for c in checks.values())
    ctl.send("done", {"last": last})
    if failure is None:
        await tail(layer, {c: checks[c].add for c in channels})
    ctl.send(
        "result",
        {
            "check": merge_checks([c.summary() for c in checks.values()]),
            "last": last,
            "failure": failure,
            "cpu": cpu,
        },
    )
    await ctl.recv("finish")
    await close_layer(layer)


async def group_producer(layer: Any, params: dict, ctl: Control) -> None:
    await warm_up(layer)
    ctl.send("ready")
    await ctl.recv("go")
    group = params["group"]
    cpu0 = time.process_time()
    first = time.monotonic()
    for seq in range(params["sends"]):
        await layer.group_send(group, {"type": "bench.group", "seq": seq, "text": "x" * params["body"]})
    sent = time.monotonic()
    ctl.send("result", {"first": first, "sent": sent, "cpu": time.process_time() - cpu0})
    await ctl.recv("finish")
    await close_layer(layer)


async def local(layer: Any, params: dict, ctl: Control) -> None:
    """Scenario 8: one process, one loop: send ``n``, then receive ``n``."""
    channel = await layer.new_channel()
    await warm_up(layer, channel)
    n = params["n"]
    text = "x" * params["body"]
    messages = [small_message(i, text) for i in range(n)]
    check = SeqCheck(n)
    send = layer.send
    cpu0 = time.process_time()
    t0 = time.monotonic()
    for message in messages:
        await send(channel, message)
    t1 = time.monotonic()
    failure = await guarded(
        receive_into(layer, channel, check), lambda: check.progress, params["timeout"], params["idle"]
    )
    t2 = check.last or time.monotonic()
    ctl.send(
        "result",
        {
            "send": t1 - t0,
            "receive": t2 - t1,
            "check": check.summary(),
            "failure": failure,
            "cpu": time.process_time() - cpu0,
        },
    )
    await close_layer(layer)


async def filler(layer: Any, params: dict, ctl: Control) -> None:
    """Scenario 6: queue ``n`` messages nobody receives; after the harness
    has measured the server, drain and check them."""
    control = await warm_up(layer)
    channel = f"bench.memory.{params['tag']}"
    n = params["n"]
    text = "m" * params["size"]
    ctl.send("ready")
    await ctl.recv("go")
    t0 = time.monotonic()
    for seq in range(n):
        await layer.send(channel, small_message(seq, text))
    await warm_up(layer, control)  # one more round trip: the server has taken every send
    ctl.send("sent", {"seconds": time.monotonic() - t0})
    await ctl.recv("drain")
    check = SeqCheck(n)
    failure = await guarded(
        receive_into(layer, channel, check), lambda: check.progress, params["timeout"], params["idle"]
    )
    ctl.send("result", {"check": check.summary(), "failure": failure})
    await close_layer(layer)


def sync_send(layer: Any, params: dict, ctl: Control) -> None:
    """Scenario 4: ``async_to_sync(layer.send)`` from plain sync code (a new
    event loop per call, as in a Django view), then one async receive of all."""
    from asgiref.sync import async_to_sync

    channel = async_to_sync(layer.new_channel)()
    async_to_sync(warm_up)(layer, channel)
    n = params["n"]
    text = "x" * params["body"]
    send = async_to_sync(layer.send)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    for seq in range(n):
        send(channel, small_message(seq, text))
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    check = SeqCheck(n)

    async def verify() -> Optional[str]:
        return await guarded(
            receive_into(layer, channel, check), lambda: check.progress, params["timeout"], params["idle"]
        )

    failure = async_to_sync(verify)()
    ctl.send("result", {"seconds": elapsed, "check": check.summary(), "failure": failure, "cpu": cpu})
    async_to_sync(close_layer)(layer)


ROLES: dict[str, Callable] = {
    "consumer": consumer,
    "producer": producer,
    "ponger": ponger,
    "pinger": pinger,
    "group_consumer": group_consumer,
    "group_producer": group_producer,
    "local": local,
    "filler": filler,
    "sync_send": sync_send,
}


def worker_main(role: str, spec: dict, params: dict, conn: Any) -> None:
    """Entry point of every worker process."""
    die_with_parent()
    ctl = Control(conn)
    try:
        setup_django()
        layer = build_layer(spec)
        fn = ROLES[role]
        if inspect.iscoroutinefunction(fn):
            asyncio.run(fn(layer, params, ctl))
        else:
            fn(layer, params, ctl)
    except BaseException as exc:  # reported to the harness, which fails the run
        try:
            ctl.send("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        except Exception:
            pass
    finally:
        conn.close()
