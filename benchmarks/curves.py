#!/usr/bin/env python
"""Cost curves: how cost grows with the work, ours beside the peers in one
run. ``python benchmarks/curves.py [--quick] [--repeat N] [--only SERIES]
[--layers a,b]``; ``make bench-curves``.

Three series, each point run for every layer that applies, the layers
interleaved within a point (their order rotated between repetitions):

- ``clients``: N = 1, 2, 4, ..., 64 client processes in a ring, each keeping
  one ping in flight to the next and answering the pings it gets: total
  msg/s, round-trip p50/p99, server CPU per message.
- ``group``: group_send to 10, 100, 1,000, 10,000 members over 2 consumer
  processes: deliveries/s (and µs per delivery) and the producer's time
  per group_send call.
- ``backlog``: 1,000 to 1,000,000 messages already queued on one channel:
  send and receive throughput on top of that backlog.

Writes benchmarks/results/curves-<date>.{json,md,png} and
curves-latest.{md,png} (``--quick`` writes curves-<date>-quick.* only).
The report gives each curve's log-log slope and says where our cost is not
flat (or linear) as it should be. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that ``benchmarks`` imports, here and in spawned workers
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

from benchmarks import report, servers  # noqa: E402
from benchmarks.curve_workers import pool_main  # noqa: E402
from benchmarks.layers import BY_NAME, Servers  # noqa: E402
from benchmarks.scenarios import Env, RunFailed, percentile, spawn_context  # noqa: E402

OURS = "ours"
PEERS = ("redis", "pubsub", "inmemory")

DEFAULT_SIZES: dict[str, dict[str, Any]] = {
    "clients": {"points": [1, 2, 4, 8, 16, 32, 64], "duration": 2.0, "window": 1, "timeout": 30},
    "group": {
        "points": [10, 100, 1000, 10_000],
        "consumers": 2,
        "deliveries": 20_000,  # sends per point: about this many deliveries, within [min_sends, max_sends]
        "min_sends": 3,
        "max_sends": 50,
        "body": 100,
        "timeout": 120,
        "idle": 20,
    },
    "backlog": {
        "points": [1000, 10_000, 100_000, 1_000_000],
        "measure": 2000,
        "body": 100,
        "concurrency": 32,
        "fill_budget": 60.0,  # skip a point whose fill would take longer (estimated from the last point)
        "timeout": 300,
        "idle": 20,
    },
}
QUICK_SIZES: dict[str, dict[str, Any]] = {
    "clients": {**DEFAULT_SIZES["clients"], "points": [1, 4], "duration": 0.5},
    "group": {**DEFAULT_SIZES["group"], "points": [10, 100], "deliveries": 500, "max_sends": 10, "timeout": 30},
    "backlog": {**DEFAULT_SIZES["backlog"], "points": [1000, 10_000], "measure": 500, "fill_budget": 10.0},
}
LAYERS = {
    "clients": ("ours", "redis", "pubsub"),
    "group": ("ours", "redis", "pubsub", "inmemory"),
    "backlog": ("ours", "redis", "inmemory"),
}
#: Points a layer cannot reach in reasonable time, and why: (series, layer) -> (largest N, reason).
LIMITS: dict[tuple[str, str], tuple[int, str]] = {
    ("group", "inmemory"): (
        1000,
        "its receive() scans every channel it has (`_clean_expired`), so one receive costs O(channels): "
        "10,000 members would take minutes",
    ),
}
NOT_APPLICABLE = {
    "inmemory": "one process only: no cross-process clients",
    "pubsub": "no server-side queue: nothing is ever queued",
}
#: Capacity for the backlog series: far above the largest backlog, so that
#: neither ChannelFull nor our send window's "more than half full: ask the
#: broker" rule interferes (that rule is measured by ``make bench``).
BACKLOG_CAPACITY = 10_000_000
BACKLOG_EXPIRY = 3600
#: Seconds the harness allows a round beyond its own timeout.
SLACK = 60.0


# ---------------------------------------------------------------------- the pool


class PoolWorker:
    def __init__(self, ctx: Any, index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=pool_main, args=(child,), name=f"curve-{index}", daemon=True)
        self.process.start()
        child.close()

    def tell(self, kind: str, payload: Any = None) -> None:
        try:
            self.conn.send((kind, payload))
        except OSError:  # gone; expect() says why
            pass

    def expect(self, kind: str, deadline: float) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"worker {self.process.name}: no {kind!r} in time", timed_out=True)
            if self.conn.poll(min(remaining, 0.5)):
                try:
                    got, payload = self.conn.recv()
                except EOFError:
                    raise RunFailed(f"worker {self.process.name} exited (status {self.process.exitcode})")
                if got == "error":
                    raise RunFailed(f"worker {self.process.name} failed: {payload}")
                if got != kind:
                    raise RunFailed(f"worker {self.process.name}: expected {kind!r}, got {got!r}")
                return payload
            if not self.process.is_alive() and not self.conn.poll():
                raise RunFailed(f"worker {self.process.name} exited (status {self.process.exitcode})")

    def stop(self) -> None:
        self.tell("quit")
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.conn.close()


class Pool:
    """Worker processes, spawned as needed and reused from round to round.
    A round that fails takes the whole pool down (its workers may be stuck
    mid-round); the next round spawns it again."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.workers: list[PoolWorker] = []

    def take(self, n: int) -> list[PoolWorker]:
        new = [PoolWorker(self.ctx, len(self.workers) + i) for i in range(n - len(self.workers))]
        self.workers += new
        deadline = time.monotonic() + 60 + 2 * len(new)
        for worker in new:
            worker.expect("up", deadline)
        return self.workers[:n]

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []


@dataclass
class Round:
    """One point for one layer: ``n`` workers, each with its role."""

    pool: Pool
    timeout: float

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout + SLACK
        self.used: list[PoolWorker] = []
        self.ok = False

    def start(self, roles: list[tuple[str, dict, dict]]) -> list[PoolWorker]:
        workers = self.pool.take(len(roles))
        for worker, (role, spec, params) in zip(workers, roles, strict=True):
            worker.tell("round", (role, spec, params))
        self.used = workers
        return workers

    def __enter__(self) -> Round:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            try:
                for worker in self.used:
                    worker.expect("closed", time.monotonic() + 20)
                return
            except RunFailed:
                pass
        self.pool.close()


# ---------------------------------------------------------------------- the series


def _spec(env: Env, layer: str, **overrides: Any) -> dict:
    return env.spec(BY_NAME[layer], **overrides)


def run_clients(env: Env, pool: Pool, layer: str, n: int, p: dict) -> dict:
    spec = _spec(env, layer)
    with Round(pool, p["duration"] + p["timeout"]) as rnd:
        workers = rnd.start([("ring", spec, p)] * n)
        channels = [w.expect("ready", rnd.deadline)["channel"] for w in workers]
        start = time.monotonic() + 0.2
        end = start + p["duration"]
        cpu0 = env.server_cpu(BY_NAME[layer])
        for i, worker in enumerate(workers):
            worker.tell("go", {"target": channels[(i + 1) % n], "start": start, "end": end})
        results = [w.expect("result", rnd.deadline) for w in workers]
        cpu1 = env.server_cpu(BY_NAME[layer])
        for worker in workers:
            worker.tell("stop")
    failures = [r["failure"] for r in results if r["failure"]]
    if failures:
        raise RunFailed(failures[0])
    latencies = [x for r in results for x in r["latencies"]]
    round_trips = sum(r["round_trips"] for r in results)
    issued = sum(r["issued"] for r in results)
    if not latencies:
        raise RunFailed("no round trip completed")
    metrics = {
        "msgs_per_s": 2 * round_trips / p["duration"],
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }
    if cpu0 is not None and cpu1 is not None:
        metrics["server_us_per_msg"] = (cpu1 - cpu0) * 1e6 / (2 * issued)
    return metrics


def group_sends(p: dict, members: int) -> int:
    return max(p["min_sends"], min(p["max_sends"], p["deliveries"] // members))


def run_group(env: Env, pool: Pool, layer: str, members: int, p: dict) -> dict:
    spec = _spec(env, layer)
    sends = group_sends(p, members)
    group = f"curve-{uuid.uuid4().hex[:10]}"
    if layer == "inmemory":
        params = dict(p, group=group, channels=members, sends=sends)
        with Round(pool, p["timeout"]) as rnd:
            [worker] = rnd.start([("group_local", spec, params)])
            worker.expect("ready", rnd.deadline)
            worker.tell("go")
            got = worker.expect("result", rnd.deadline)
        results, first, times = [got], got["first"], got["times"]
        cpu0 = cpu1 = None
    else:
        per = members // p["consumers"]
        params = dict(p, group=group, channels=per, sends=sends)
        with Round(pool, p["timeout"]) as rnd:
            workers = rnd.start([("group_member", spec, params)] * p["consumers"] + [("group_sender", spec, params)])
            for worker in workers:
                worker.expect("ready", rnd.deadline)
            cpu0 = env.server_cpu(BY_NAME[layer])
            workers[-1].tell("go")
            sent = workers[-1].expect("result", rnd.deadline)
            results = [w.expect("result", rnd.deadline) for w in workers[:-1]]
            cpu1 = env.server_cpu(BY_NAME[layer])
        first, times = sent["first"], sent["times"]
    failures = [r["failure"] for r in results if r["failure"]]
    if failures:
        raise RunFailed(failures[0])
    check = {k: sum(r["check"][k] for r in results) for k in results[0]["check"]}
    bad = {k: v for k, v in check.items() if k not in ("expected", "received") and v}
    if bad:
        raise RunFailed(f"sequence check failed: {bad}")
    deliveries = check["expected"]
    elapsed = max(r["last"] for r in results) - first
    metrics = {
        "deliveries_per_s": deliveries / elapsed,
        "us_per_delivery": elapsed * 1e6 / deliveries,
        "ms_per_group_send": statistics.median(times) * 1e3,
        "receiver_cpu_us": sum(r["cpu"] for r in results) * 1e6 / deliveries,
        "sends": sends,
    }
    if cpu0 is not None and cpu1 is not None:
        metrics["server_cpu_us"] = (cpu1 - cpu0) * 1e6 / deliveries
    return metrics


def run_backlog(env: Env, pool: Pool, layer: str, queued: int, p: dict) -> dict:
    overrides: dict[str, Any] = {"capacity": BACKLOG_CAPACITY, "expiry": BACKLOG_EXPIRY}
    spec = _spec(env, layer, **overrides)
    measure = min(p["measure"], queued)
    params = dict(p, queued=queued, measure=measure, tag=uuid.uuid4().hex[:10])
    with Round(pool, p["timeout"]) as rnd:
        [worker] = rnd.start([("backlog", spec, params)])
        worker.expect("ready", rnd.deadline)
        worker.tell("go")
        got = worker.expect("result", rnd.deadline)
    if got["failure"]:
        raise RunFailed(got["failure"])
    check = got["check"]
    bad = {k: check[k] for k in ("duplicates", "malformed") if check[k]}
    if check["received"] != measure:
        bad["received"] = check["received"]
    if bad:
        raise RunFailed(f"sequence check failed: {bad}")
    return {
        "send_per_s": measure / got["send"],
        "receive_per_s": measure / got["receive"],
        "fill_per_s": queued / got["fill"],
    }


RUNNERS: dict[str, Callable[[Env, Pool, str, int, dict], dict]] = {
    "clients": run_clients,
    "group": run_group,
    "backlog": run_backlog,
}


@dataclass(frozen=True)
class Curve:
    """One plotted and tabled metric of a series."""

    series: str
    key: str
    title: str
    unit: str
    higher_is_better: bool
    #: The log-log slope a sound implementation shows (0: flat, 1: linear
    #: in the work); None: no expectation (a throughput that saturates).
    expected: Optional[float]
    why: str = ""
    #: The slope is fitted over the points from this one on (a fixed cost
    #: per call dominates the smallest groups).
    fit_from: int = 0


CURVES: list[Curve] = [
    Curve("clients", "msgs_per_s", "(a) total throughput vs client processes", "msg/s", True, None),
    Curve("clients", "p50_ms", "(a) round trip p50 vs client processes", "ms", False, None),
    Curve("clients", "p99_ms", "(a) round trip p99 vs client processes", "ms", False, None),
    Curve(
        "clients",
        "server_us_per_msg",
        "(a) server CPU per message vs client processes",
        "µs CPU",
        False,
        0.0,
        "the server's work per message should not depend on how many clients there are",
    ),
    Curve("group", "deliveries_per_s", "(b) group_send deliveries/s vs group size", "deliveries/s", True, None),
    Curve(
        "group",
        "us_per_delivery",
        "(b) time per delivery vs group size",
        "µs",
        False,
        0.0,
        "each member costs the same whatever the group's size",
        100,
    ),
    Curve(
        "group",
        "server_cpu_us",
        "(b) server CPU per delivery vs group size",
        "µs CPU",
        False,
        0.0,
        "each member costs the server the same whatever the group's size",
        100,
    ),
    Curve(
        "group",
        "receiver_cpu_us",
        "(b) receiving processes' CPU per delivery vs group size",
        "µs CPU",
        False,
        0.0,
        "each member costs its process the same whatever the group's size",
        100,
    ),
    Curve(
        "group",
        "ms_per_group_send",
        "(b) producer's time per group_send call vs group size",
        "ms",
        False,
        0.0,
        "ours returns before the fan-out (the layer's group_send is pipelined), whatever the"
        " group's size; channels_redis answers once every member has it queued, linear in the members",
        100,
    ),
    Curve(
        "backlog",
        "send_per_s",
        "(c) send throughput vs queued backlog",
        "msg/s",
        True,
        0.0,
        "appending to a queue should not depend on its length",
    ),
    Curve(
        "backlog",
        "receive_per_s",
        "(c) receive throughput vs queued backlog",
        "msg/s",
        True,
        0.0,
        "taking from the head should not depend on the queue's length",
    ),
]
#: A slope further than this from the expected one is reported as "not flat/linear".
TOLERANCE = 0.15


# ---------------------------------------------------------------------- report


def _median(records: list[dict], series: str, x: int, layer: str, key: str) -> Optional[float]:
    values = [
        r["metrics"][key]
        for r in records
        if r["series"] == series and r["x"] == x and r["layer"] == layer and r["ok"] and key in r["metrics"]
    ]
    return statistics.median(values) if values else None


def slope(points: list[tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of log y against log x."""
    pts = [(math.log10(x), math.log10(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def steepest_step(
    values: dict[int, Optional[float]], expected: float, since: int = 0
) -> Optional[tuple[int, int, float]]:
    """The pair of neighbouring points whose local log-log slope is furthest
    from ``expected``: a curve flat overall may still bend at one end."""
    pts = [(x, y) for x, y in sorted(values.items()) if y and x >= since]
    steps = [(a[0], b[0], slope([a, b])) for a, b in itertools.pairwise(pts)]
    steps = [(a, b, s) for a, b, s in steps if s is not None]
    if not steps:
        return None
    return max(steps, key=lambda step: abs(step[2] - expected))


def summarize(meta: dict, records: list[dict]) -> dict:
    """Medians per curve, layer and point, and each curve's slope."""
    out: dict[str, Any] = {}
    for curve in CURVES:
        if curve.series not in meta["series"]:
            continue
        xs = meta["sizes"][curve.series]["points"]
        layers = [name for name in meta["layers"][curve.series]]
        table = {layer: {x: _median(records, curve.series, x, layer, curve.key) for x in xs} for layer in layers}
        slopes = {
            layer: slope([(x, v) for x, v in values.items() if v is not None and x >= curve.fit_from])
            for layer, values in table.items()
        }
        out[f"{curve.series}.{curve.key}"] = {"xs": xs, "table": table, "slopes": slopes}
    return out


def _fmt(value: Optional[float]) -> str:
    return report.fmt(value) if value is not None else "-"


def _ratio(ours: Optional[float], peer: Optional[float], higher: bool) -> str:
    if not ours or not peer:
        return "-"
    return f"{ours / peer:.2f}"


def _verdict(curve: Curve, value: Optional[float]) -> str:
    if curve.expected is None or value is None:
        return ""
    if abs(value - curve.expected) <= TOLERANCE:
        return "as expected"
    shape = "flat" if curve.expected == 0 else "linear"
    # For a rate, a falling curve means a growing cost; for a cost, a rising one.
    worse = value < curve.expected if curve.higher_is_better else value > curve.expected
    return f"**not {shape}** ({'cost grows' if worse else 'cost falls'})"


def markdown(meta: dict, summary: dict, records: list[dict]) -> str:
    m = meta["machine"]
    v = m["versions"]
    lines = [
        f"# Cost curves {meta['date']}{' (quick)' if meta['quick'] else ''}",
        "",
        f"`make bench-curves` (benchmarks/curves.py). Median of {meta['repeat']} repetition(s) per point "
        "(backlog: 1); layers interleaved within each point, so the ratios compare numbers measured side by "
        f"side. Run took {meta['duration_s'] / 60:.1f} min.",
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; load average "
        f"{meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end (other work shares it).",
        f"Python {m['python']}; django-message-broker {v.get('django-message-broker')} (commit {m.get('git_commit')}), "
        f"channels {v.get('channels')}, channels_redis {v.get('channels_redis')}, Redis {v.get('redis-server')}, "
        f"pyzmq {v.get('pyzmq')} (libzmq {v.get('libzmq')}).",
        "",
        "Layers: " + "; ".join(f"`{n}` = {BY_NAME[n].label}" for n in meta["all_layers"]) + ".",
        "",
    ]
    for name, reason in meta.get("skipped_layers", {}).items():
        lines.append(f"**Layer `{name}` not run:** {reason}.")
    sizes = meta["sizes"]
    explain = {
        "clients": (
            f"N client processes in a ring; each keeps {sizes.get('clients', {}).get('window', 1)} ping in flight to "
            "the next one's `new_channel()` and answers the pings it gets with a pong; "
            f"{sizes.get('clients', {}).get('duration', 0)} s per point. msg/s counts pings and pongs; latency is "
            "the round trip (two messages through the server); server CPU is the broker's or redis-server's "
            "(all threads) per message."
        ),
        "group": (
            "group_send of a 100 B text to N members (`new_channel()`s) spread over "
            f"{sizes.get('group', {}).get('consumers', 2)} consumer processes, from a third process; "
            "each member has received once before the timed part (receives waiting, credit granted); "
            "the number of group_sends per point is in the table. deliveries/s runs from the first group_send "
            "to the last delivery. `inmemory` runs members and producer in one process (it cannot do otherwise)."
        ),
        "backlog": (
            "One process fills one channel with N messages (100 B text, "
            f"{sizes.get('backlog', {}).get('concurrency', 100)} sends at a time), then times "
            f"{sizes.get('backlog', {}).get('measure', 0):,} more sequential sends (until the server has them) and "
            f"as many receives from the head. Capacity {BACKLOG_CAPACITY:,}: the channel is never near full."
        ),
    }
    for series in meta["series"]:
        lines += [f"## {series}", "", explain[series], ""]
        for name, reason in meta["not_applicable"].get(series, {}).items():
            lines.append(f"- `{name}` not run: {reason}.")
        for note in meta["skipped_points"].get(series, []):
            lines.append(f"- {note}")
        lines.append("")
        for curve in [c for c in CURVES if c.series == series]:
            data = summary.get(f"{series}.{curve.key}")
            if data is None:
                continue
            layers = list(data["table"])
            peers = [layer for layer in layers if layer != OURS]
            better = "higher is better" if curve.higher_is_better else "**lower is better**"
            lines += [f"### {curve.title} ({curve.unit}; {better})", ""]
            header = ["N", *layers, *[f"ours/{peer}" for peer in peers if OURS in layers]]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(["---:"] * len(header)) + "|")
            for x in data["xs"]:
                row = [f"{x:,}"] + [_fmt(data["table"][layer][x]) for layer in layers]
                if OURS in layers:
                    ours = data["table"][OURS][x]
                    row += [_ratio(ours, data["table"][peer][x], curve.higher_is_better) for peer in peers]
                lines.append("| " + " | ".join(row) + " |")
            slopes = " · ".join(
                f"{layer} {data['slopes'][layer]:+.2f}" for layer in layers if data["slopes"][layer] is not None
            )
            since = f" (fitted from N={curve.fit_from:,})" if curve.fit_from else ""
            lines += ["", f"Log-log slope{since}: {slopes or '-'}."]
            if curve.expected is not None:
                lines.append(f"Expected {curve.expected:+.0f} ({curve.why}).")
            lines.append("")
    lines += ["## Slopes against what they should be", ""]
    lines.append("| curve | expected | " + " | ".join(meta["all_layers"]) + f" | {OURS} |")
    lines.append("|---|---:|" + "---:|" * len(meta["all_layers"]) + "---|")
    for curve in CURVES:
        data = summary.get(f"{curve.series}.{curve.key}")
        if data is None or curve.expected is None:
            continue
        cells = []
        for layer in meta["all_layers"]:
            value = data["slopes"].get(layer)
            cells.append("-" if value is None else f"{value:+.2f}")
        verdict = _verdict(curve, data["slopes"].get(OURS))
        step = steepest_step(data["table"].get(OURS, {}), curve.expected, curve.fit_from)
        if step is not None and abs(step[2] - curve.expected) > 2 * TOLERANCE:
            bend = f"from {step[0]:,} to {step[1]:,} the slope is {step[2]:+.2f}"
            verdict = f"**bends**: {bend} (overall {verdict})" if verdict == "as expected" else f"{verdict}; {bend}"
        lines.append(f"| {curve.title} | {curve.expected:+.0f} | " + " | ".join(cells) + f" | {verdict} |")
    lines += [
        "",
        f'A slope within ±{TOLERANCE} of the expected one reads "as expected". The slope is a least-squares fit '
        "over the points named above; where two neighbouring points of ours are further than "
        f"{2 * TOLERANCE:.1f} from it, the last column names them (the curve bends there).",
        "",
    ]
    failures = [r for r in records if not r["ok"]]
    if failures:
        lines += ["## Failed points", ""]
        for r in failures:
            first = (r["error"] or "?").strip().splitlines()[0][:300]
            lines.append(f"- {r['series']} N={r['x']:,} / {r['layer']} / rep {r['rep'] + 1}: {first}")
        lines.append("")
    return "\n".join(lines)


COLORS = {"ours": "#1f77b4", "redis": "#d62728", "pubsub": "#ff7f0e", "inmemory": "#2ca02c"}


def chart(meta: dict, summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
        return False
    panels: list[list[Curve]] = [
        [c for c in CURVES if c.series == "clients" and c.key == "msgs_per_s"],
        [c for c in CURVES if c.series == "clients" and c.key in ("p50_ms", "p99_ms")],
        [c for c in CURVES if c.series == "clients" and c.key == "server_us_per_msg"],
        [c for c in CURVES if c.series == "group" and c.key == "deliveries_per_s"],
        [c for c in CURVES if c.series == "group" and c.key in ("server_cpu_us", "receiver_cpu_us")],
        [c for c in CURVES if c.series == "group" and c.key == "ms_per_group_send"],
        [c for c in CURVES if c.series == "backlog"],
    ]
    panels = [p for p in panels if any(f"{c.series}.{c.key}" in summary for c in p)]
    if not panels:
        return False
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, curves in zip(axes.flat, panels, strict=False):
        styles = ["-", "--"]
        for style, curve in zip(styles, curves, strict=False):
            data = summary.get(f"{curve.series}.{curve.key}")
            if data is None:
                continue
            suffix = f" {curve.key.split('_')[0]}" if len(curves) > 1 else ""
            for layer, values in data["table"].items():
                pts = [(x, y) for x, y in values.items() if y]
                if not pts:
                    continue
                s = data["slopes"].get(layer)
                label = f"{layer}{suffix}" + (f" (slope {s:+.2f})" if s is not None else "")
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=COLORS.get(layer), label=label)
        first = curves[0]
        title = first.title
        if len(curves) > 1:
            title = {
                "p50_ms": "(a) round trip p50 (solid) / p99 (dashed) vs client processes",
                "server_cpu_us": "(b) CPU per delivery: server (solid) / receivers (dashed)",
                "send_per_s": "(c) send (solid) / receive (dashed) throughput vs queued backlog",
            }.get(first.key, first.title)
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(
            {"clients": "client processes", "group": "group members", "backlog": "messages queued"}[first.series]
        )
        ax.set_ylabel(f"{first.unit} ({'higher' if first.higher_is_better else 'lower'} is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Cost curves {meta['date']}{' (quick)' if meta['quick'] else ''}, log-log", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(out_dir: Path, meta: dict, records: list[dict], *, latest: bool) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(meta, records)
    stem = f"curves-{meta['date']}" + ("-quick" if meta["quick"] else "") + ("" if meta["complete"] else "-partial")
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    document = {"meta": meta, "summary": summary, "runs": records}
    paths["json"].write_text(json.dumps(document, indent=1, default=str) + "\n")
    text = markdown(meta, summary, records)
    if chart(meta, summary, paths["png"]):
        text += f"\n![Cost curves, log-log]({paths['png'].name})\n"
    else:
        paths.pop("png")
    paths["md"].write_text(text)
    if latest:
        shutil.copyfile(paths["md"], out_dir / "curves-latest.md")
        latest_md = out_dir / "curves-latest.md"
        latest_md.write_text(latest_md.read_text().replace(f"]({stem}.png)", "](curves-latest.png)"))
        if "png" in paths:
            shutil.copyfile(paths["png"], out_dir / "curves-latest.png")
    return paths


# ---------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test of about a minute (curves-<date>-quick.*)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions per point (default 2; backlog: always 1)")
    parser.add_argument("--only", default="", help="comma-separated series: clients, group, backlog")
    parser.add_argument("--layers", default="", help="comma-separated layers: ours, redis, pubsub, inmemory")
    parser.add_argument("--points", default="", help="comma-separated N: only these points of the series run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only render the .md and .png again from a JSON")
    args = parser.parse_args(argv)
    if args.report:
        document = json.loads(args.report.read_text())
        meta = document["meta"]
        for written in write(args.report.parent, meta, document["runs"], latest=False).values():
            print(f"wrote {written}")
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    series = [s.strip() for s in args.only.split(",") if s.strip()] or list(RUNNERS)
    for name in series:
        if name not in RUNNERS:
            parser.error(f"unknown series {name!r}; choose from {', '.join(RUNNERS)}")
    wanted = [w.strip() for w in args.layers.split(",") if w.strip()] or [OURS, *PEERS]
    for name in wanted:
        if name not in (OURS, *PEERS):
            parser.error(f"unknown layer {name!r}")
    skipped_layers: dict[str, str] = {}
    for name in wanted:
        reason = BY_NAME[name].available()
        if reason is None and "redis" in BY_NAME[name].needs and not shutil.which(args.redis_server):
            reason = f"{args.redis_server} not found"
        if reason:
            skipped_layers[name] = reason
            print(f"skipping layer {name}: {reason}", file=sys.stderr)
    runnable = [n for n in wanted if n not in skipped_layers]
    layers = {s: [n for n in LAYERS[s] if n in runnable] for s in series}
    not_applicable = {
        s: {n: NOT_APPLICABLE[n] for n in runnable if n not in LAYERS[s] and n in NOT_APPLICABLE} for s in series
    }
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    sizes = {s: sizes[s] for s in series}
    if args.points:
        wanted_points = {int(x) for x in args.points.split(",") if x.strip()}
        sizes = {s: {**v, "points": [x for x in v["points"] if x in wanted_points]} for s, v in sizes.items()}

    def stop_on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: write what was measured, then stop

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)

    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeat": args.repeat,
        "series": series,
        "layers": layers,
        "all_layers": [n for n in (OURS, *PEERS) if any(n in v for v in layers.values())],
        "not_applicable": not_applicable,
        "skipped_layers": skipped_layers,
        "skipped_points": {},
        "sizes": sizes,
        "loadavg_start": os.getloadavg(),
        "machine": report.machine_info(args.redis_server),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    needed = {need for names in layers.values() for n in names for need in BY_NAME[n].needs}
    processes: dict[str, servers.ServerProcess] = {}
    info = Servers()
    records: list[dict] = []
    interrupted = False
    pool = Pool(spawn_context())
    try:
        for need in sorted(needed):
            if need == "redis":
                processes["redis"], info.redis_port = servers.redis_server(args.redis_server)
            elif need == "broker":
                processes["broker"], info.broker_address = servers.broker_server()
            print(f"started {need} (pid {processes[need].pid})", flush=True)
        env = Env(spawn_context(), info, processes)
        for name in series:
            p = sizes[name]
            repeat = 1 if name == "backlog" else args.repeat
            fill_rate: dict[str, float] = {}
            for x in p["points"]:
                for rep in range(repeat):
                    order = layers[name][rep % len(layers[name]) :] + layers[name][: rep % len(layers[name])]
                    for layer in order:
                        prefix = f"{name:<8} N={x:<9,} rep {rep + 1}/{repeat} {layer:<9}"
                        limit = LIMITS.get((name, layer))
                        if limit is not None and x > limit[0]:
                            if rep == 0:
                                note = f"`{layer}` at {x:,}: skipped, {limit[1]}"
                                meta["skipped_points"].setdefault(name, []).append(note)
                            print(f"{prefix} skipped (limit)", flush=True)
                            continue
                        if name == "backlog" and layer in fill_rate and x / fill_rate[layer] > p["fill_budget"]:
                            note = (
                                f"`{layer}` at {x:,} queued: skipped, filling it would take about "
                                f"{x / fill_rate[layer]:.0f} s at the {fill_rate[layer]:,.0f} msg/s measured at the "
                                f"previous point (budget {p['fill_budget']:.0f} s)"
                            )
                            meta["skipped_points"].setdefault(name, []).append(note)
                            print(f"{prefix} skipped (fill budget)", flush=True)
                            continue
                        print(prefix, end=" ", flush=True)
                        t0 = time.monotonic()
                        record: dict[str, Any] = {"series": name, "x": x, "layer": layer, "rep": rep}
                        try:
                            record["metrics"] = RUNNERS[name](env, pool, layer, x, p)
                            record["ok"], record["error"] = True, None
                        except RunFailed as exc:
                            record.update(ok=False, error=str(exc), metrics={})
                        except Exception as exc:
                            record.update(ok=False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                            record["metrics"] = {}
                        try:
                            env.cleanup(BY_NAME[layer])
                        except Exception as exc:
                            print(f"(cleanup failed: {exc})", end=" ")
                        record["wall_s"] = round(time.monotonic() - t0, 2)
                        records.append(record)
                        if record["ok"] and "fill_per_s" in record["metrics"]:
                            fill_rate[layer] = record["metrics"]["fill_per_s"]
                        shown = ", ".join(f"{k}={report.fmt(v)}" for k, v in record["metrics"].items())
                        status = "ok" if record["ok"] else "FAIL: " + (record["error"] or "").strip().splitlines()[0]
                        print(f"{shown} {status[:200]} ({record['wall_s']:.1f}s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        pool.close()
        for path in servers.stop_all(keep_logs=any(not r["ok"] for r in records)):
            print(f"server log kept: {path}", file=sys.stderr)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["complete"] = not interrupted and not args.only and not args.layers and not args.points
    if not records:
        print("nothing was run", file=sys.stderr)
        return 1
    paths = write(args.out, meta, records, latest=meta["complete"] and not args.quick)
    print()
    print(paths["md"].read_text())
    for written in paths.values():
        print(f"wrote {written}")
    print(f"total {meta['duration_s'] / 60:.1f} min")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
