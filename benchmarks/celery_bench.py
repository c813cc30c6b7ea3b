#!/usr/bin/env python
"""Celery on three brokers in one run: ``python benchmarks/celery_bench.py
[--quick] [--repeat N] [--brokers dmb,redis,rabbitmq]``.

For each broker in turn, the harness starts the broker on free loopback
ports (our broker, ``redis-server``, RabbitMQ), one ``celery worker -P
prefork -c 2`` against it, and drives the same workloads from this process
as the producer:

1. latency: tasks sent one at a time to the idle worker; each task records
   ``time.time()`` at its start against the send time it was given;
2. publish alone: tasks published to a queue nobody consumes (then purged);
3. throughput: tasks published as fast as the producer can while the worker
   runs them, from the first publish to the last task done, and the CPU time
   of the broker's processes (and the worker's) meanwhile.

Completion needs no result backend: every task appends a line to a file
(``benchmarks/celery_app.py``), which the harness counts. Writes
``benchmarks/results/<date>-celery.{json,md}`` and ``celery-latest.md``;
``--quick`` writes ``<date>-celery-quick.*`` only. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that ``benchmarks`` imports
    sys.path.insert(0, str(ROOT))

from benchmarks import report, servers  # noqa: E402

BROKERS = ["dmb", "redis", "rabbitmq"]
LABELS = {"dmb": "dmb:// (ours)", "redis": "Redis transport", "rabbitmq": "RabbitMQ (py-amqp)"}
DEFAULT_SIZES = {"tasks": 10_000, "latency_tasks": 500, "latency_warmup": 20, "warm_tasks": 50}
QUICK_SIZES = {"tasks": 1_000, "latency_tasks": 100, "latency_warmup": 10, "warm_tasks": 20}
#: Pause after a latency task ran before sending the next, so that the
#: worker is idle again (its pool process has reported back, the ack is out).
LATENCY_GAP = 0.005
X = "\u00d7"  # the multiplication sign of the ratios
WORKER_ARGS = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"]
PACKAGES = ["celery", "kombu", "amqp", "redis", "pyzmq", "psutil", "django-message-broker"]


class WorkloadFailed(Exception):
    pass


# ----------------------------------------------------------------- helpers


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (all threads)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class Lines:
    """A file that tasks append lines to, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: Optional[Any] = None
        self.lines: list[bytes] = []
        self._tail = b""

    def poll(self) -> int:
        if self.handle is None:
            try:
                self.handle = open(self.path, "rb")  # closed in close()
            except FileNotFoundError:
                return 0
        data = self._tail + self.handle.read()
        *complete, self._tail = data.split(b"\n")
        self.lines.extend(complete)
        return len(self.lines)

    def wait_for(self, count: int, *, timeout: float, stall: float = 20.0, sleep: float = 0.001) -> None:
        """Until ``count`` lines, at most ``timeout`` s, or ``stall`` s without a new line."""
        start = last_progress = time.monotonic()
        seen = self.poll()
        while seen < count:
            now = time.monotonic()
            if now - start > timeout or now - last_progress > stall:
                raise WorkloadFailed(f"{self.path.name}: {seen} of {count} lines after {now - start:.1f}s")
            time.sleep(sleep)
            got = self.poll()
            if got != seen:
                seen, last_progress = got, time.monotonic()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ----------------------------------------------------------------- brokers


@dataclass
class Broker:
    name: str
    url: str
    process: servers.ServerProcess
    cleanup: Callable[[], None] = lambda: None

    def cpu(self) -> float:
        return tree_cpu(self.process.pid)


def start_broker(name: str, args: argparse.Namespace) -> Broker:
    if name == "dmb":
        process, address = servers.broker_server()
        return Broker(name, "dmb://" + address.split("://", 1)[1], process)
    if name == "redis":
        directory = tempfile.mkdtemp(prefix="bench-redis-")
        process, port = servers.redis_server(args.redis_server, directory=directory)
        return Broker(name, f"redis://127.0.0.1:{port}/0", process, lambda: shutil.rmtree(directory, True))
    if name == "rabbitmq":
        rabbit, port = servers.rabbitmq_server()
        return Broker(name, f"pyamqp://guest:guest@127.0.0.1:{port}//", rabbit)
    raise ValueError(name)


def broker_missing(name: str, args: argparse.Namespace) -> Optional[str]:
    if name == "redis" and not shutil.which(args.redis_server):
        return f"{args.redis_server} not found"
    if name == "rabbitmq":
        return servers.rabbitmq_missing()
    return None


# ----------------------------------------------------------------- worker


class Worker:
    """``celery worker -P prefork -c 2`` on one broker, in its own session."""

    def __init__(self, url: str, directory: Path, name: str) -> None:
        self.directory = directory
        self.log_path = directory / "worker.log"
        env = servers.child_env()
        env.update(DMB_BENCH_BROKER=url, DMB_BENCH_DIR=str(directory))
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.celery_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-n",
            f"bench-{name}@%h",
            *WORKER_ARGS,
        ]
        if servers._SETPRIV:
            command = [servers._SETPRIV, "--pdeathsig", "TERM", "--", *command]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        ready = Lines(self.directory / "ready")
        deadline = time.monotonic() + timeout
        try:
            while ready.poll() < 1:
                if self.process.poll() is not None:
                    raise WorkloadFailed(f"the worker exited with status {self.process.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise WorkloadFailed(f"the worker was not ready within {timeout}s:\n{self.log_tail()}")
                time.sleep(0.05)
        finally:
            ready.close()

    def cpu(self) -> float:
        return tree_cpu(self.process.pid)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise WorkloadFailed(f"the worker exited with status {self.process.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to its process group."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the pool processes, whatever is left
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        except OSError:
            return ""


# ----------------------------------------------------------------- workloads


@dataclass
class Result:
    broker: str
    rep: int
    ok: bool = True
    error: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def run_broker(name: str, rep: int, args: argparse.Namespace, sizes: dict[str, int]) -> Result:
    from benchmarks.celery_app import NOOP, STAMP, WARM, make_app

    result = Result(name, rep)
    directory = Path(tempfile.mkdtemp(prefix=f"bench-celery-{name}-"))
    broker: Optional[Broker] = None
    worker: Optional[Worker] = None
    app = None
    keep = False
    files: list[Lines] = []
    try:
        t0 = time.monotonic()
        try:
            broker = start_broker(name, args)
        except Exception:
            result.raw["start_failed"] = True
            raise
        result.raw["broker_start_s"] = round(time.monotonic() - t0, 2)
        result.raw["url"] = broker.url
        worker = Worker(broker.url, directory, name)
        worker.wait_ready()
        app = make_app(broker.url)

        # Warm-up: the producer's connection, the worker's pool processes.
        warm = Lines(directory / "warm")
        files.append(warm)
        for i in range(sizes["warm_tasks"]):
            app.send_task(WARM, args=(i,))
        warm.wait_for(sizes["warm_tasks"], timeout=60)
        time.sleep(0.2)

        # 1. Latency on an idle worker, one task at a time.
        latency = Lines(directory / "latency")
        files.append(latency)
        total = sizes["latency_warmup"] + sizes["latency_tasks"]
        for i in range(total):
            app.send_task(STAMP, args=(time.time(),))
            latency.wait_for(i + 1, timeout=10, stall=10, sleep=0.0005)
            time.sleep(LATENCY_GAP)
        worker.check_alive()
        samples = []
        for line in latency.lines[sizes["latency_warmup"] :]:
            sent, started = (float(x) for x in line.split())
            samples.append((started - sent) * 1000.0)
        result.metrics["latency_p50_ms"] = statistics.median(samples)
        result.metrics["latency_p99_ms"] = percentile(samples, 99)
        result.metrics["latency_mean_ms"] = statistics.fmean(samples)
        result.raw["latency_ms"] = [round(s, 4) for s in samples]

        # 2. Publish alone: into a queue without a consumer, then purge it.
        n = sizes["tasks"]
        app.send_task(NOOP, queue="bench-idle")  # declares the queue
        cpu0 = broker.cpu()
        t0 = time.perf_counter()
        for _ in range(n):
            app.send_task(NOOP, queue="bench-idle")
        elapsed = time.perf_counter() - t0
        cpu1 = broker.cpu()
        result.metrics["publish_only_per_s"] = n / elapsed
        result.raw["publish_only_broker_cpu_s"] = round(cpu1 - cpu0, 3)
        with app.connection_for_write() as conn:
            purged = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # publishes may still be in flight
                purged = (purged or 0) + int(conn.default_channel.queue_purge("bench-idle") or 0)
                if purged >= n + 1:
                    break
                time.sleep(0.1)
        result.raw["purged"] = purged
        if purged != n + 1:
            result.raw["purge_note"] = f"purged {purged}, published {n + 1}"

        # 3. Throughput, and the broker's CPU meanwhile.
        done = Lines(directory / "done")
        files.append(done)
        time.sleep(0.2)
        bcpu0, wcpu0 = broker.cpu(), worker.cpu()
        first = time.time()
        for _ in range(n):
            app.send_task(NOOP)
        published = time.time()
        done.wait_for(n, timeout=30 + n / 50, stall=20, sleep=0.005)
        bcpu1, wcpu1 = broker.cpu(), worker.cpu()
        finished = sorted(float(x) for x in done.lines)
        last = finished[-1]
        gaps = [b - a for a, b in itertools.pairwise([first, *finished])]
        time.sleep(0.3)  # late duplicates
        extra = done.poll() - n
        result.metrics["tasks_per_s"] = n / (last - first)
        result.metrics["publish_per_s"] = n / (published - first)
        result.metrics["broker_cpu_s_per_1000"] = (bcpu1 - bcpu0) / (n / 1000)
        result.metrics["worker_cpu_s_per_1000"] = (wcpu1 - wcpu0) / (n / 1000)
        result.metrics["max_pause_ms"] = max(gaps) * 1000.0
        result.raw["throughput"] = {
            "tasks": n,
            "publish_s": round(published - first, 4),
            "end_to_end_s": round(last - first, 4),
            "broker_cpu_s": round(bcpu1 - bcpu0, 3),
            "worker_cpu_s": round(wcpu1 - wcpu0, 3),
            "duplicates": extra,
            "pauses_over_100ms": sum(1 for g in gaps if g > 0.1),
            "pauses_over_1s_total_s": round(sum(g for g in gaps if g > 1.0), 3),
            "done_before_last_publish": sum(1 for t in finished if t <= published),
        }
        if extra:
            raise WorkloadFailed(f"{extra} tasks ran more than once")
        worker.check_alive()
    except Exception as exc:
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, WorkloadFailed):
            result.error += "\n" + traceback.format_exc()
        keep = True
    finally:
        for lines in files:
            lines.close()
        if app is not None:
            try:
                app.close()
            except Exception:
                pass
        if worker is not None:
            worker.stop()
            if keep:
                result.raw["worker_log_tail"] = worker.log_tail()
        if broker is not None:
            if keep:
                result.raw["broker_log_tail"] = broker.process.log_tail()
            broker.process.stop()
            broker.process.remove_log()
            broker.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    return result


# ----------------------------------------------------------------- report

#: (key, label, unit, higher is better)
METRICS = [
    ("tasks_per_s", "throughput, first publish to last task done", "tasks/s", True),
    ("publish_per_s", "publish rate during that run", "tasks/s", True),
    ("publish_only_per_s", "publish rate alone (queue with no consumer)", "tasks/s", True),
    ("latency_p50_ms", "delay-to-start latency p50, idle worker", "ms", False),
    ("latency_p99_ms", "delay-to-start latency p99", "ms", False),
    ("broker_cpu_s_per_1000", "broker CPU per 1,000 tasks (during throughput)", "CPU s", False),
    ("worker_cpu_s_per_1000", "worker CPU per 1,000 tasks (parent + 2 pool processes)", "CPU s", False),
    ("max_pause_ms", "longest pause between two task completions (during throughput)", "ms", False),
]


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def summarize(results: list[dict], brokers: list[str], metrics: Any = None) -> dict[str, dict[str, Optional[float]]]:
    """metric -> broker -> the median over the repetitions that passed (NaN,
    a value not measured, left out); ``metrics`` (key first in each entry)
    defaults to this benchmark's ``METRICS``."""
    table: dict[str, dict[str, Optional[float]]] = {}
    for key, *_ in METRICS if metrics is None else metrics:
        row: dict[str, Optional[float]] = {}
        for broker in brokers:
            values = [r["metrics"][key] for r in results if r["broker"] == broker and r["ok"] and key in r["metrics"]]
            values = [v for v in values if not math.isnan(v)]
            row[broker] = statistics.median(values) if values else None
        table[key] = row
    return table


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def render(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    brokers = meta["brokers"]
    table = summarize(results, brokers)
    sizes = meta["sizes"]
    out = [f"# Celery benchmark: {meta['date']}{' (quick)' if meta['quick'] else ''}", ""]
    out.append(
        f"{sizes['tasks']:,} empty tasks (`ignore_result`), one producer (the harness), one "
        f"`celery worker -P prefork -c 2 {' '.join(WORKER_ARGS)}`; latency over "
        f"{sizes['latency_tasks']} tasks sent one at a time to the idle worker. "
        f"{meta['repeat']} repetition(s) per broker{'; medians' if meta['repeat'] > 1 else ''}. "
        "Started " + meta["started_at"] + f", {meta['duration_s']:.0f} s in all."
    )
    out.append("")
    header = ["metric", "unit", *(LABELS[b] for b in brokers)]
    others = [b for b in ("redis", "rabbitmq") if b in brokers and b != "dmb"]
    if "dmb" in brokers:
        header += [f"ours / {LABELS[b].split(' ')[0]}" for b in others]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for key, label, unit, _higher in METRICS:
        row = table[key]
        cells = [label, unit, *(fmt(row[b]) for b in brokers)]
        if "dmb" in brokers:
            cells += [(lambda r: f"{r:.2f}{X}" if r is not None else "-")(ratio(row["dmb"], row[b])) for b in others]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Throughput and publish rates: higher is better. Latency and CPU: lower is better.")
    out.append("")

    if "dmb" in brokers:
        out += ["## Against the targets of issue 11", ""]
        out.append("| target | measured | met? |")
        out.append("|---|---|---|")

        def line(target: str, value: Optional[float], text: str, ok: Optional[bool]) -> None:
            verdict = "n/a" if ok is None or value is None else ("yes" if ok else "no")
            out.append(f"| {target} | {text if value is not None else 'n/a'} | {verdict} |")

        tps, p50 = table["tasks_per_s"], table["latency_p50_ms"]
        r = ratio(tps["dmb"], tps.get("redis"))
        line(
            f"throughput ≥ 1.5{X} the Redis transport",
            r,
            f"{r:.2f}{X} ({fmt(tps['dmb'])} vs {fmt(tps.get('redis'))} tasks/s)" if r else "",
            r >= 1.5 if r else None,
        )
        r = ratio(tps["dmb"], tps.get("rabbitmq"))
        line(
            "throughput above RabbitMQ's",
            r,
            f"{r:.2f}{X} ({fmt(tps['dmb'])} vs {fmt(tps.get('rabbitmq'))} tasks/s)" if r else "",
            r > 1.0 if r else None,
        )
        r = ratio(p50["dmb"], p50.get("redis"))
        line(
            f"latency p50 ≤ 0.5{X} the Redis transport's",
            r,
            f"{r:.2f}{X} ({fmt(p50['dmb'])} vs {fmt(p50.get('redis'))} ms)" if r else "",
            r <= 0.5 if r else None,
        )
        line(
            "latency p50 ≤ 2 ms",
            p50["dmb"],
            f"{fmt(p50['dmb'])} ms" if p50["dmb"] is not None else "",
            p50["dmb"] <= 2.0 if p50["dmb"] is not None else None,
        )
        out.append("")

    notes = []
    for broker, reason in meta.get("skipped", {}).items():
        notes.append(f"- {LABELS[broker]} not run: {reason}")
    for r in results:
        if not r["ok"]:
            first = (r["error"] or "").strip().splitlines()[:3]
            what = "could not be started" if r["raw"].get("start_failed") else "failed"
            notes.append(f"- {LABELS[r['broker']]} repetition {r['rep'] + 1} {what}: " + " / ".join(first))
        if r["raw"].get("purge_note"):
            notes.append(f"- {LABELS[r['broker']]}: {r['raw']['purge_note']}")
    if notes:
        out += ["## Notes", "", *notes, ""]

    out += ["## Setup", "", *report.setup_lines(meta)]
    out.append(
        "- brokers: ours (`python -m django_message_broker serve`), `redis-server --save '' --appendonly no`, "
        f"RabbitMQ with no plugins and Erlang `{servers.RABBITMQ_ERL_ARGS}` (no scheduler busy-wait), "
        "each on free loopback ports and alone on the machine while it is measured; the broker CPU is user + "
        "system time of its process tree (psutil)"
    )
    out.append(f"- command: `{meta['command']}`")
    out.append("")
    return "\n".join(out)


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import psutil

    cpu = report.cpu_model()
    versions = report.package_versions(PACKAGES)

    def run(command: list[str]) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    if shutil.which(args.redis_server):
        out = run([args.redis_server, "--version"])
        versions["redis-server"] = out.split("v=")[1].split()[0] if "v=" in out else out or None
    versions["rabbitmq-server"] = run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"]) or None
    versions["erlang"] = run(["dpkg-query", "-W", "-f=${Version}", "erlang-base"]) or None
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or None,
    }


def write(out_dir: Path, data: dict, *, latest: bool) -> list[Path]:
    meta = data["meta"]
    stem = f"{meta['date']}-celery" + ("-quick" if meta["quick"] else "" if meta["complete"] else "-partial")
    return report.write_results(out_dir, data, stem, render(data), "celery-latest.md" if latest else None)


# ----------------------------------------------------------------- main


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end a run as ``SystemExit``: its ``finally``
    blocks stop the servers it started."""

    def stop_on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)


def runnable_brokers(brokers: list[str], args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """The brokers this machine cannot run, with why (each said on stderr),
    and the others, in order."""
    skipped = {}
    for broker in brokers:
        reason = broker_missing(broker, args)
        if reason:
            skipped[broker] = reason
            print(f"skipping {broker}: {reason}", file=sys.stderr)
    return skipped, [b for b in brokers if b not in skipped]


def run_meta(
    args: argparse.Namespace,
    argv: Optional[list[str]],
    sizes: dict[str, Any],
    brokers: list[str],
    skipped: dict[str, str],
    **extra: Any,
) -> dict[str, Any]:
    """A run's report header: when, what was asked, ``extra``, the machine
    and the command line."""
    return {
        "date": dt.date.today().isoformat(),
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeat": args.repeat,
        "sizes": sizes,
        "brokers": brokers,
        "skipped": skipped,
        **extra,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(args),
        "command": " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)]),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 tasks: a smoke test (writes <date>-celery-quick.*)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions per broker (default 1; medians)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated: " + ", ".join(BROKERS))
    parser.add_argument("--tasks", type=int, help="tasks for throughput (default 10,000; 1,000 with --quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only render the .md again from a saved JSON")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        print(render(data))
        return 0
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS]
    if unknown or not brokers:
        parser.error(f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(BROKERS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = dict(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.tasks:
        sizes["tasks"] = args.tasks

    exit_on_signals()
    skipped, runnable = runnable_brokers(brokers, args)
    started = time.monotonic()
    meta = run_meta(args, argv, sizes, brokers, skipped)
    results: list[dict] = []
    interrupted = False
    try:
        for rep in range(args.repeat):
            shift = rep % max(1, len(runnable))
            for broker in runnable[shift:] + runnable[:shift]:  # rotate to spread order effects
                print(f"rep {rep + 1}/{args.repeat} {broker:<8}", end=" ", flush=True)
                t0 = time.monotonic()
                result = run_broker(broker, rep, args, sizes)
                shown = ", ".join(f"{k}={fmt(v)}" for k, v in result.metrics.items())
                status = "ok" if result.ok else "FAIL: " + (result.error or "").strip().splitlines()[0][:300]
                print(f"{shown} {status} ({time.monotonic() - t0:.1f}s)", flush=True)
                results.append(result.__dict__)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        servers.stop_all()
    complete = brokers == BROKERS and not args.tasks
    return finish_run(args, meta, results, started, interrupted, complete, write, render)


def finish_run(
    args: argparse.Namespace,
    meta: dict[str, Any],
    results: list[dict],
    started: float,
    interrupted: bool,
    complete: bool,
    write: Callable[..., list[Path]],
    render: Callable[[dict], str],
) -> int:
    """Close the report (duration, load, complete or not), write it (also as
    the latest when complete and not ``--quick``), print it; the exit
    status. A reference broker that does not start (RabbitMQ, typically)
    is reported, not a failure."""
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["interrupted"] = interrupted
    meta["complete"] = not interrupted and complete
    if not results:
        print("nothing was run", file=sys.stderr)
        return 1
    data = {"meta": meta, "results": results}
    paths = write(args.out, data, latest=meta["complete"] and not args.quick)
    print()
    print(render(data))
    for path in paths:
        print(f"wrote {path}")
    failed = [
        r for r in results if not r["ok"] and not (not r["broker"].startswith("dmb") and r["raw"].get("start_failed"))
    ]
    return 1 if interrupted or failed else 0


if __name__ == "__main__":
    sys.exit(main())
