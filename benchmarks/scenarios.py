"""The scenarios, seen from the harness: spawn workers, hand out channel
names, take server measurements around the timed part, turn the workers'
reports into metrics.

Each ``run_<scenario>(env, factory, params)`` returns a ``Outcome``; a
worker error, a missed deadline, or a failed sequence check makes the
outcome not ``ok`` and keeps it out of the medians. ``METRICS`` lists the
table's rows.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import psutil

from .layers import LayerFactory, Servers
from .servers import ServerProcess, broker_server
from .workers import worker_main

#: Seconds a run may spend starting its workers and connecting them, on
#: top of the scenario's own timeout.
SPAWN_ALLOWANCE = 45.0

DEFAULT_SIZES: dict[str, dict[str, Any]] = {
    "throughput": {"n": 2000, "body": 100, "timeout": 60, "idle": 10},
    "rtt": {"n": 1000, "warmup": 50, "timeout": 60, "idle": 10},
    "group": {"channels": 1000, "consumers": 2, "sends": 10, "body": 100, "timeout": 90, "idle": 15},
    "sync_send": {"n": 1000, "body": 100, "timeout": 90, "idle": 15},
    "large": {"n": 30, "size": 1_000_000, "timeout": 90, "idle": 15},
    "memory": {"n": 10_000, "size": 1000, "timeout": 120, "idle": 15},
    "local": {"n": 2000, "body": 100, "timeout": 60, "idle": 10},
}

QUICK_SIZES: dict[str, dict[str, Any]] = {
    "throughput": {"n": 200, "body": 100, "timeout": 30, "idle": 8},
    "rtt": {"n": 50, "warmup": 5, "timeout": 30, "idle": 8},
    "group": {"channels": 20, "consumers": 2, "sends": 3, "body": 100, "timeout": 30, "idle": 8},
    "sync_send": {"n": 50, "body": 100, "timeout": 30, "idle": 8},
    "large": {"n": 3, "size": 1_000_000, "timeout": 30, "idle": 8},
    "memory": {"n": 500, "size": 1000, "timeout": 30, "idle": 8},
    "local": {"n": 200, "body": 100, "timeout": 30, "idle": 8},
}


# ------------------------------------------------------------------ outcomes


class RunFailed(Exception):
    """A worker failed, or the harness's deadline passed."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class Outcome:
    metrics: dict[str, float] = field(default_factory=dict)
    check: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def verify(self, *failures: Optional[str]) -> Outcome:
        """Fail the outcome on a worker's timeout or on a bad check."""
        for failure in failures:
            if failure:
                self.error = f"worker gave up: {failure}"
                self.timed_out = True
                return self
        bad = {k: v for k, v in self.check.items() if k not in ("expected", "received") and v}
        if bad:
            self.error = f"sequence check failed: {bad}"
        return self


# --------------------------------------------------------------------- plumbing


def cpu_seconds(pid: int) -> float:
    """CPU time of a process: the sum of its live threads' nanosecond
    ``/proc/<pid>/task/*/schedstat`` where Linux has it (libzmq's I/O thread
    included), else psutil's user+system (10 ms ticks, coarse for a quick
    run). Long-lived servers keep their threads, so nothing is missed."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


@dataclass
class Env:
    """What a scenario run needs from the harness."""

    ctx: Any  # a multiprocessing 'spawn' context
    servers: Servers
    processes: dict[str, ServerProcess]

    def spec(self, factory: LayerFactory, **overrides: Any) -> dict:
        return factory.spec(self.servers, **overrides)

    def server_cpu(self, factory: LayerFactory) -> Optional[float]:
        process = self.processes.get(factory.server or "")
        if process is None or not process.alive():
            return None
        return cpu_seconds(process.pid)

    def redis(self) -> Any:
        import redis

        assert self.servers.redis_port is not None
        return redis.Redis(host="127.0.0.1", port=self.servers.redis_port, socket_timeout=10)

    def cleanup(self, factory: LayerFactory) -> None:
        """Leave the server empty for the next run."""
        if factory.server == "redis" and self.servers.redis_port:
            client = self.redis()
            try:
                client.flushall()
            finally:
                client.close()
        elif factory.server == "broker" and self.servers.broker_address:
            from django_message_broker import SyncClient

            with SyncClient(self.servers.broker_address, timeout=10) as client:
                client.flush()


class Worker:
    def __init__(self, team: Team, role: str, spec: dict, params: dict) -> None:
        self.team = team
        self.role = role
        self.conn, child = team.env.ctx.Pipe()
        self.process = team.env.ctx.Process(
            target=worker_main, args=(role, spec, params, child), name=f"bench-{role}", daemon=True
        )
        self.process.start()
        child.close()
        self.early: dict[str, Any] = {}  # progress reports nobody waited for

    def expect(self, kind: str) -> Any:
        if kind in self.early:
            return self.early.pop(kind)
        while True:
            remaining = self.team.deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"{self.role}: no {kind!r} before the harness's deadline", timed_out=True)
            if self.conn.poll(min(remaining, 0.5)):
                try:
                    got, payload = self.conn.recv()
                except EOFError:
                    self.process.join(1)
                    raise RunFailed(f"{self.role} exited (status {self.process.exitcode}) before sending {kind!r}")
                if got == "error":
                    raise RunFailed(f"{self.role} failed: {payload}")
                if got == "done" and kind != "done":
                    self.early[got] = payload
                    continue
                if got != kind:
                    raise RunFailed(f"{self.role}: expected {kind!r}, got {got!r}")
                return payload
            if not self.process.is_alive() and not self.conn.poll():
                raise RunFailed(f"{self.role} exited (status {self.process.exitcode}) before sending {kind!r}")

    def tell(self, kind: str, payload: Any = None) -> None:
        try:
            self.conn.send((kind, payload))
        except OSError:  # the worker is gone; expect() reports why
            pass

    def stop(self, grace: float) -> None:
        self.process.join(grace)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.conn.close()


class Team:
    """The workers of one run. On leaving, each is told to finish, given a
    moment, then terminated; nothing outlives the run."""

    def __init__(self, env: Env, timeout: float) -> None:
        self.env = env
        self.deadline = time.monotonic() + SPAWN_ALLOWANCE + timeout
        self.workers: list[Worker] = []

    def spawn(self, role: str, spec: dict, params: dict) -> Worker:
        worker = Worker(self, role, spec, params)
        self.workers.append(worker)
        return worker

    def __enter__(self) -> Team:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        grace = 10.0 if exc_type is None else 0.5
        for worker in self.workers:
            worker.tell("finish")
        for worker in self.workers:
            worker.stop(grace)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


# -------------------------------------------------------------------- scenarios


def _a_to_b(
    env: Env, factory: LayerFactory, p: dict, measure_cpu: bool
) -> tuple[Outcome, float, Optional[float], Optional[str]]:
    """A producer process sends ``n`` messages to a consumer process.
    Returns the outcome (raw timings filled in), the seconds from the first
    send to the last receive, the server's CPU seconds meanwhile, and the
    consumer's failure, if any."""
    spec = env.spec(factory)
    cpu0 = cpu1 = None
    with Team(env, p["timeout"]) as team:
        consumer = team.spawn("consumer", spec, p)
        producer = team.spawn("producer", spec, p)
        channel = consumer.expect("ready")["channel"]
        producer.expect("ready")
        if measure_cpu:
            cpu0 = env.server_cpu(factory)
        producer.tell("go", {"channel": channel})
        sent = producer.expect("result")
        if measure_cpu:
            consumer.expect("done")
            cpu1 = env.server_cpu(factory)
        got = consumer.expect("result")
    out = Outcome(check=got["check"])
    elapsed = got["last"] - sent["first"]
    out.raw = {
        "seconds": elapsed,
        "send_seconds": sent["sent"] - sent["first"],
        "producer_cpu": sent["cpu"],
        "consumer_cpu": got["cpu"],
    }
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return out, elapsed, cpu, got["failure"]


def run_throughput(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(1) and (7): ``n`` small messages A->B; the server's CPU meanwhile."""
    out, elapsed, cpu, failure = _a_to_b(env, factory, p, measure_cpu=True)
    if failure is None and elapsed > 0:
        out.metrics["msgs_per_s"] = p["n"] / elapsed
        if cpu is not None:
            out.raw["server_cpu"] = cpu
            out.metrics["server_cpu_per_10k"] = cpu * 10_000 / p["n"]
    return out.verify(failure)


def run_large(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(5): ``n`` messages of ``size`` bytes A->B."""
    p = dict(p, head=os.urandom(16))
    out, elapsed, _, failure = _a_to_b(env, factory, p, measure_cpu=False)
    if failure is None and elapsed > 0:
        out.metrics["mb_per_s"] = p["n"] * p["size"] / elapsed / 1e6
    return out.verify(failure)


def run_rtt(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(2): ping on one channel, pong on another, between two processes."""
    spec = env.spec(factory)
    with Team(env, p["timeout"]) as team:
        ponger = team.spawn("ponger", spec, p)
        pinger = team.spawn("pinger", spec, p)
        channel = ponger.expect("ready")["channel"]
        pinger.expect("ready")
        pinger.tell("go", {"channel": channel})
        got = pinger.expect("result")
        ponger.expect("result")
    lat = got["latencies"]
    out = Outcome(check=got["check"], raw={"latencies_us": [round(x * 1e6, 1) for x in lat]})
    if got["failure"] is None and lat:
        out.metrics = {
            "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3,
        }
    return out.verify(got["failure"])


def run_group(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(3): ``sends`` group_sends to ``channels`` members over ``consumers`` processes."""
    spec = env.spec(factory)
    group = f"bench-{uuid.uuid4().hex[:10]}"
    per = p["channels"] // p["consumers"]
    params = dict(p, group=group, channels=per)
    with Team(env, p["timeout"]) as team:
        consumers = [team.spawn("group_consumer", spec, params) for _ in range(p["consumers"])]
        producer = team.spawn("group_producer", spec, params)
        for consumer in consumers:
            consumer.expect("ready")
        producer.expect("ready")
        producer.tell("go")
        sent = producer.expect("result")
        results = [c.expect("result") for c in consumers]
    checks: dict[str, int] = {}
    for result in results:
        for key, value in result["check"].items():
            checks[key] = checks.get(key, 0) + value
    out = Outcome(check=checks)
    failures = [r["failure"] for r in results]
    elapsed = max(r["last"] for r in results) - sent["first"]
    deliveries = per * p["consumers"] * p["sends"]
    out.raw = {
        "seconds": elapsed,
        "deliveries": deliveries,
        "group_send_seconds": sent["sent"] - sent["first"],
        "consumer_cpu": [r["cpu"] for r in results],
    }
    if not any(failures) and elapsed > 0:
        out.metrics["deliveries_per_s"] = deliveries / elapsed
    return out.verify(*failures)


def run_sync_send(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(4): ``async_to_sync(layer.send)`` from sync code, then check delivery."""
    with Team(env, p["timeout"]) as team:
        got = team.spawn("sync_send", env.spec(factory), p).expect("result")
    out = Outcome(check=got["check"], raw={"seconds": got["seconds"], "cpu": got["cpu"]})
    if got["seconds"] > 0:
        out.metrics["calls_per_s"] = p["n"] / got["seconds"]
    return out.verify(got["failure"])


def run_local(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(8): one process sends ``n`` to its own channel, then receives ``n``."""
    with Team(env, p["timeout"]) as team:
        got = team.spawn("local", env.spec(factory), p).expect("result")
    out = Outcome(
        check=got["check"], raw={"send_seconds": got["send"], "receive_seconds": got["receive"], "cpu": got["cpu"]}
    )
    if got["failure"] is None and got["send"] > 0 and got["receive"] > 0:
        out.metrics = {
            "msgs_per_s": p["n"] / (got["send"] + got["receive"]),
            "send_per_s": p["n"] / got["send"],
            "receive_per_s": p["n"] / got["receive"],
        }
    return out.verify(got["failure"])


def run_memory(env: Env, factory: LayerFactory, p: dict) -> Outcome:
    """(6): the server's memory before and after ``n`` messages of ``size``
    bytes are queued and not consumed. Our broker runs fresh for each
    repetition (a Python process keeps freed memory, so a reused broker
    would look better in later repetitions); Redis is measured by its own
    accounting (``INFO memory`` used_memory) after FLUSHALL."""
    temp: Optional[ServerProcess] = None
    redis_client = None
    try:
        if factory.server == "broker":
            temp, address = broker_server()
            spec = env.spec(factory, address=address)
            process = psutil.Process(temp.pid)

            def measure() -> dict:
                return {"bytes": process.memory_info().rss, "rss": process.memory_info().rss}

        elif factory.server == "redis":
            redis_client = env.redis()
            redis_client.flushall()
            spec = env.spec(factory)
            redis_process = psutil.Process(env.processes["redis"].pid)

            def measure() -> dict:
                info = redis_client.info("memory")
                return {
                    "bytes": info["used_memory"],
                    "used_memory_rss": info["used_memory_rss"],
                    "rss": redis_process.memory_info().rss,
                }

        else:
            raise RunFailed(f"no server to measure for {factory.name}")
        params = dict(p, tag=uuid.uuid4().hex[:10])
        with Team(env, p["timeout"]) as team:
            filler = team.spawn("filler", spec, params)
            filler.expect("ready")
            before = measure()
            filler.tell("go")
            sent = filler.expect("sent")
            after = measure()
            filler.tell("drain")
            got = filler.expect("result")
            drained = measure()
        growth = after["bytes"] - before["bytes"]
        out = Outcome(
            check=got["check"],
            raw={"before": before, "after": after, "after_drain": drained, "send_seconds": sent["seconds"]},
        )
        out.metrics = {"growth_mb": growth / 1e6, "bytes_per_msg": growth / p["n"]}
        return out.verify(got["failure"])
    finally:
        if redis_client is not None:
            redis_client.close()
        if temp is not None:
            temp.stop()
            temp.remove_log()


@dataclass(frozen=True)
class Scenario:
    name: str
    number: int
    run: Callable[[Env, LayerFactory, dict], Outcome]
    summary: str


SCENARIOS: list[Scenario] = [
    Scenario("throughput", 1, run_throughput, "cross-process A->B small messages (also gives 7, server CPU)"),
    Scenario("rtt", 2, run_rtt, "request/reply between two processes"),
    Scenario("group", 3, run_group, "group_send to many channels over two consumer processes"),
    Scenario("sync_send", 4, run_sync_send, "async_to_sync(layer.send) from sync code"),
    Scenario("large", 5, run_large, "1 MB messages A->B"),
    Scenario("memory", 6, run_memory, "server memory for queued, unconsumed messages"),
    Scenario("local", 8, run_local, "one process sends N then receives N"),
]
BY_NAME = {s.name: s for s in SCENARIOS}
ALIASES = {"cpu": "throughput", "7": "throughput", **{str(s.number): s.name for s in SCENARIOS}}


@dataclass(frozen=True)
class Metric:
    scenario: str  # the scenario whose runs carry it
    key: str
    label: Callable[[dict], str]  # from the sizes
    unit: str
    higher_is_better: bool
    layers_scenario: str = ""  # which layers apply, if not ``scenario``'s

    def applies(self, factory: LayerFactory) -> bool:
        return factory.supports(self.layers_scenario or self.scenario)


def _n(value: int) -> str:
    return f"{value:,}"


METRICS: list[Metric] = [
    Metric(
        "throughput",
        "msgs_per_s",
        lambda s: f"1. cross-process A->B, {_n(s['throughput']['n'])} x {s['throughput']['body']} B",
        "msg/s",
        True,
    ),
    Metric("rtt", "p50_ms", lambda s: f"2. request/reply p50, {_n(s['rtt']['n'])} round trips", "ms", False),
    Metric("rtt", "p99_ms", lambda s: f"2. request/reply p99, {_n(s['rtt']['n'])} round trips", "ms", False),
    Metric(
        "group",
        "deliveries_per_s",
        lambda s: (
            f"3. group_send x{s['group']['sends']} to {_n(s['group']['channels'])} channels"
            f" / {s['group']['consumers']} processes"
        ),
        "deliveries/s",
        True,
    ),
    Metric(
        "sync_send",
        "calls_per_s",
        lambda s: f"4. async_to_sync(send) from sync code, {_n(s['sync_send']['n'])} calls",
        "calls/s",
        True,
    ),
    Metric(
        "large",
        "mb_per_s",
        lambda s: f"5. large messages A->B, {s['large']['n']} x {_n(s['large']['size'])} B",
        "MB/s",
        True,
    ),
    Metric(
        "memory",
        "growth_mb",
        lambda s: f"6. server memory growth, {_n(s['memory']['n'])} x {_n(s['memory']['size'])} B queued",
        "MB",
        False,
    ),
    Metric(
        "throughput",
        "server_cpu_per_10k",
        lambda s: "7. server CPU per 10,000 messages (from 1)",
        "CPU s",
        False,
        "cpu",
    ),
    Metric(
        "local",
        "msgs_per_s",
        lambda s: f"8. one process: send {_n(s['local']['n'])} then receive (overall)",
        "msg/s",
        True,
    ),
    Metric("local", "send_per_s", lambda s: "8a. ... send phase", "msg/s", True),
    Metric("local", "receive_per_s", lambda s: "8b. ... receive phase", "msg/s", True),
]


def spawn_context() -> Any:
    return multiprocessing.get_context("spawn")
