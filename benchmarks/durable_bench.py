#!/usr/bin/env python
"""Confirmed publishes of persistent messages to a durable queue, on three
brokers in one run: ``python benchmarks/durable_bench.py [--quick]
[--brokers dmb-always,dmb-everysec,dmb-off,redis,rabbitmq]``.

For each broker in turn (one at a time, each with a fresh data directory,
all of them under one directory, so on one filesystem):

- ours: ``python -m django_message_broker serve --data-dir D --fsync
  always|everysec|off`` (through ``benchmarks.durable_broker``, which also
  writes the store's commit counters), kombu ``dmb://`` with
  ``confirm_publish``;
- the Redis transport on ``redis-server --appendonly yes --appendfsync
  always`` (no confirms in kombu's transport: a publish returns when Redis
  answered ``LPUSH``, after its fsync);
- RabbitMQ, kombu's py-amqp transport with ``confirm_publish``.

Producers are processes of their own (``spawn``), each with one kombu
connection, publishing 1 KB persistent messages (``delivery_mode=2``) to one
durable queue, one at a time, each waiting for its confirm. Two phases on each
broker: 1 producer, then 16 at once; each runs for ``--seconds`` or until a
producer has published ``--messages``. After each phase the queue is
purged, and the purge must count every confirmed message (for ours, the
SQLite file must hold them too, before the purge). Writes
``benchmarks/results/<date>-durable.{json,md}`` and ``durable-latest.md``.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that ``benchmarks`` imports
    sys.path.insert(0, str(ROOT))

from benchmarks import report, servers  # noqa: E402
from benchmarks.celery_bench import (  # noqa: E402
    Result,
    exit_on_signals,
    finish_run,
    fmt,
    percentile,
    ratio,
    run_meta,
    runnable_brokers,
    summarize,
    tree_cpu,
)

BROKERS = ["dmb-always", "dmb-everysec", "dmb-off", "redis", "rabbitmq"]
#: Not run by default: ours with no data directory (the queue lives in memory;
#: a confirm answers once the message is queued), to see the path without the store.
EXTRA_BROKERS = ["dmb-memory"]
LABELS = {
    "dmb-memory": "ours, no --data-dir (memory)",
    "dmb-always": "ours, fsync always",
    "dmb-everysec": "ours, fsync everysec",
    "dmb-off": "ours, fsync off",
    "redis": "Redis, appendfsync always",
    "rabbitmq": "RabbitMQ, durable + confirms",
}
DEFAULT_SIZES = {"seconds": 3.0, "messages": 2000, "producers": 16, "body": 1024, "warmup": 20}
QUICK_SIZES = {"seconds": 1.0, "messages": 300, "producers": 4, "body": 1024, "warmup": 5, "repeat": 1}
QUEUE = "bench-durable"
X = "\u00d7"
PACKAGES = ["kombu", "amqp", "redis", "pyzmq", "psutil", "django-message-broker"]


# ----------------------------------------------------------------- producers


def producer_main(index: int, pipe: Any) -> None:
    """One producer process: commands from the harness over ``pipe``."""
    servers.die_with_parent()
    from kombu import Connection, Producer, Queue

    import django_message_broker.celery  # noqa: F401  (registers dmb://)

    conn: Any = None
    producer: Any = None
    queue: Any = None
    body = b""

    def publish() -> None:
        producer.publish(
            body,
            routing_key=queue.name,
            delivery_mode=2,
            content_type="application/octet-stream",
            content_encoding="binary",
            retry=False,
        )

    while True:
        if not pipe.poll(900):  # the harness is gone
            return
        command, *rest = pipe.recv()
        try:
            if command == "connect":
                url, options, name, size, warmup = rest
                body = os.urandom(size)
                conn = Connection(url, transport_options=options, connect_timeout=10)
                conn.connect()
                producer = Producer(conn.channel())
                queue = Queue(name, routing_key=name, durable=True)
                producer.publish(body, routing_key=name, delivery_mode=2, declare=[queue], retry=False,
                                 content_type="application/octet-stream", content_encoding="binary")  # fmt: skip
                for _ in range(warmup):
                    publish()
                pipe.send(("ok", None))
            elif command == "run":
                start_at, seconds, limit = rest
                while time.monotonic() < start_at:
                    time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
                began = time.monotonic()
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                deadline = start_at + seconds
                clock = time.perf_counter
                latencies: list[float] = []
                count = 0
                end = began
                while count < limit:
                    t0 = clock()
                    publish()
                    latencies.append(clock() - t0)
                    count += 1
                    end = time.monotonic()
                    if end >= deadline:
                        break
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)  # every thread: the client's I/O thread too
                cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
                pipe.send(("ok", {"count": count, "began": began, "end": end, "latencies": latencies, "cpu_s": cpu}))
            elif command == "close":
                if conn is not None:
                    conn.release()
                conn = producer = queue = None
                pipe.send(("ok", None))
            elif command == "exit":
                pipe.send(("ok", None))
                return
            else:
                pipe.send(("error", f"unknown command {command!r}"))
        except Exception as exc:
            pipe.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class Producers:
    """``n`` producer processes, started once for the whole run."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.processes = []
        for i in range(n):
            here, there = ctx.Pipe()
            process = ctx.Process(target=producer_main, args=(i, there), name=f"producer-{i}", daemon=True)
            process.start()
            there.close()
            self.pipes.append(here)
            self.processes.append(process)

    def call(self, indices: list[int], command: tuple, timeout: float) -> list[Any]:
        """Send ``command`` to the producers ``indices``, then wait for every answer."""
        for i in indices:
            self.pipes[i].send(command)
        deadline = time.monotonic() + timeout
        answers = []
        errors = []
        for i in indices:
            pipe = self.pipes[i]
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise WorkloadFailed(f"producer {i}: no answer to {command[0]!r} within {timeout:.0f}s")
            status, value = pipe.recv()
            if status != "ok":
                errors.append(f"producer {i}: {value}")
            answers.append(value)
        if errors:
            raise WorkloadFailed(f"{len(errors)} producer(s) failed; the first: {errors[0]}")
        return answers

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit",))
            except OSError:
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


class WorkloadFailed(Exception):
    pass


# ----------------------------------------------------------------- brokers


@dataclass
class Broker:
    name: str
    url: str
    options: dict[str, Any]
    process: servers.ServerProcess
    data_dir: str
    #: ours: the SQLite file; counters in data_dir/bench-store-stats.json
    store_path: Optional[str] = None

    def cpu(self) -> float:
        return tree_cpu(self.process.pid)

    def store_stats(self) -> Optional[dict[str, Any]]:
        if self.store_path is None:
            return None
        from benchmarks.durable_broker import STATS_FILE

        try:
            return dict(json.loads(Path(self.data_dir, STATS_FILE).read_text()))
        except (OSError, ValueError):
            return None

    def stored_messages(self) -> Optional[int]:
        """Ours: the messages of the queue in the SQLite file (what was committed)."""
        if self.store_path is None:
            return None
        with sqlite3.connect(self.store_path, timeout=10) as db:
            return int(db.execute("SELECT count(*) FROM messages WHERE queue = ?", (QUEUE,)).fetchone()[0])


STRACE = shutil.which("strace") or "strace"
SYNC_CALLS = ("fsync", "fdatasync")


def strace_wrap(args: argparse.Namespace, out_path: str) -> list[str]:
    """With ``--strace``: the server runs under ``strace -f --seccomp-bpf``
    (only the sync calls stop), which counts them and their wall-clock time
    (``-c -w``) into ``out_path``. The server gets SIGTERM if strace ends.
    Counts only: a multi-threaded server under ``strace -f`` is much slower
    (wake-ups between its threads), so the rates of such a run are not
    comparable."""
    if not args.strace:
        return []
    command = [STRACE, "-f", "--seccomp-bpf", "-qq", "-c", "-w", "-e", "trace=" + ",".join(SYNC_CALLS), "-o", out_path]
    return [*command, servers._SETPRIV or "setpriv", "--pdeathsig", "TERM", "--"]


def read_strace(path: str) -> Optional[dict[str, Any]]:
    """``strace -c -w``'s table: calls and seconds of each sync call."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found: dict[str, Any] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in SYNC_CALLS:
            found[parts[-1]] = {"calls": int(parts[3]), "seconds": float(parts[1])}
    return found


def stop_under_strace(process: servers.ServerProcess, timeout: float = 30.0) -> None:
    """strace writes its counts when its last tracee ends (not when it is
    stopped itself): SIGTERM to every process under it, then wait for it."""
    import psutil

    if not process.alive():
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=timeout / 2)
    if isinstance(process, servers.RabbitMQProcess):  # its epmd daemonized, but strace follows it too
        process.kill_epmd()
    assert process.process is not None
    try:
        process.process.wait(timeout / 2)
    except subprocess.TimeoutExpired:
        pass


def start_broker(name: str, args: argparse.Namespace, data_dir: str) -> Broker:
    wrap = strace_wrap(args, os.path.join(data_dir, "strace.txt"))
    if name == "dmb-memory":
        process, address = servers.broker_server(module="benchmarks.durable_broker", wrap=wrap)
        return Broker(name, "dmb://" + address.split("://", 1)[1], {"confirm_publish": True}, process, data_dir)
    if name.startswith("dmb-"):
        from django_message_broker.server.server import STORE_FILE

        fsync = name.split("-", 1)[1]
        store_dir = os.path.join(data_dir, "data")
        extra = ["--data-dir", store_dir, "--fsync", fsync]
        if args.commit_delay_ms:
            extra += ["--bench-commit-delay-ms", str(args.commit_delay_ms)]
        process, address = servers.broker_server(extra=extra, module="benchmarks.durable_broker", wrap=wrap)
        return Broker(
            name,
            "dmb://" + address.split("://", 1)[1],
            {"confirm_publish": True},
            process,
            store_dir,
            os.path.join(store_dir, STORE_FILE),
        )
    if name == "redis":
        process, port = servers.redis_server(args.redis_server, directory=data_dir, appendfsync="always", wrap=wrap)
        return Broker(name, f"redis://127.0.0.1:{port}/0", {}, process, data_dir)
    if name == "rabbitmq":
        rabbit, port = servers.rabbitmq_server(parent=data_dir, wrap=wrap)
        return Broker(name, f"pyamqp://guest:guest@127.0.0.1:{port}//", {"confirm_publish": True}, rabbit, data_dir)
    raise ValueError(name)


def purge(url: str) -> int:
    from kombu import Connection

    import django_message_broker.celery  # noqa: F401

    with Connection(url, connect_timeout=10) as conn:
        return int(conn.default_channel.queue_purge(QUEUE) or 0)


def filesystem(path: str) -> dict[str, str]:
    """What ``df -T`` says of ``path``."""
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=10, check=False).stdout
        device, kind, *_rest, mount = out.strip().splitlines()[-1].split()
        return {"path": path, "device": device, "type": kind, "mount": mount}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {"path": path}


# ----------------------------------------------------------------- workloads


def run_phase(broker: Broker, producers: Producers, n: int, sizes: dict[str, Any], result: Result, key: str) -> None:
    """``n`` producers publish at once; then the checks and the purge."""
    indices = list(range(n))
    purge(broker.url)  # the warm-up messages
    import psutil

    stats0 = broker.store_stats()
    machine0 = psutil.cpu_times()
    cpu0 = broker.cpu()
    start_at = time.monotonic() + 0.3
    answers = producers.call(indices, ("run", start_at, sizes["seconds"], sizes["messages"]), sizes["seconds"] + 120)
    cpu1 = broker.cpu()
    machine1 = psutil.cpu_times()
    count = sum(a["count"] for a in answers)
    elapsed = max(a["end"] for a in answers) - start_at
    latencies = [x for a in answers for x in a["latencies"]]
    raw: dict[str, Any] = {
        "producers": n,
        "confirmed": count,
        "elapsed_s": round(elapsed, 4),
        "per_producer": [a["count"] for a in answers],
        "start_skew_ms": round((max(a["began"] for a in answers) - start_at) * 1000, 1),
        "broker_cpu_s": round(cpu1 - cpu0, 3),
    }
    result.metrics[f"{key}_per_s"] = count / elapsed
    result.metrics[f"{key}_p50_ms"] = statistics.median(latencies) * 1000
    result.metrics[f"{key}_p99_ms"] = percentile(latencies, 99) * 1000
    result.metrics[f"{key}_cpu_ms_per_msg"] = (cpu1 - cpu0) * 1000 / count
    result.metrics[f"{key}_client_cpu_ms_per_msg"] = sum(a["cpu_s"] for a in answers) * 1000 / count
    idle = (machine1.idle + machine1.iowait) - (machine0.idle + machine0.iowait)
    total = sum(machine1) - sum(machine0)
    result.metrics[f"{key}_machine_busy"] = 1.0 - idle / total if total > 0 else math.nan
    stored = broker.stored_messages()  # ours: confirmed means committed
    if stored is not None:
        raw["stored"] = stored
        if stored < count:
            raise WorkloadFailed(f"{key}: {count} publishes confirmed, {stored} in the SQLite file")
    time.sleep(0.1)
    stats1 = broker.store_stats()
    if stats0 is not None and stats1 is not None:
        commits = stats1["commits"] - stats0["commits"]
        raw["commits"] = commits
        raw["synced_batches"] = stats1["synced_batches"] - stats0["synced_batches"]
        result.metrics[f"{key}_msgs_per_commit"] = count / commits if commits else math.nan
        write_s = stats1.get("write_s", 0.0) - stats0.get("write_s", 0.0)
        raw["write_s"] = round(write_s, 4)
        result.metrics[f"{key}_ms_per_commit"] = write_s * 1000 / commits if commits else math.nan
        result.metrics[f"{key}_store_busy"] = write_s / elapsed
    purged = purge(broker.url)
    raw["purged"] = purged
    if purged < count:
        raise WorkloadFailed(f"{key}: {count} publishes confirmed, {purged} in the queue")
    if purged > count:  # a publish that failed after the broker queued it
        raw["purge_note"] = f"purged {purged}, confirmed {count}"
    result.raw[key] = raw


def run_broker(
    name: str, rep: int, args: argparse.Namespace, sizes: dict[str, Any], producers: Producers, root: str
) -> Result:
    result = Result(name, rep)
    data_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    broker: Optional[Broker] = None
    n = sizes["producers"]
    connected = False
    try:
        t0 = time.monotonic()
        try:
            broker = start_broker(name, args, data_dir)
        except Exception:
            result.raw["start_failed"] = True
            raise
        result.raw["broker_start_s"] = round(time.monotonic() - t0, 2)
        result.raw["url"] = broker.url
        connected = True
        producers.call(
            list(range(n)),
            ("connect", broker.url, broker.options, QUEUE, sizes["body"], sizes["warmup"]),
            120,
        )
        run_phase(broker, producers, 1, sizes, result, "one")
        time.sleep(0.3)
        run_phase(broker, producers, n, sizes, result, "many")
        one, many = result.metrics["one_per_s"], result.metrics["many_per_s"]
        result.metrics["group_ratio"] = many / one
        if not broker.process.alive():
            raise WorkloadFailed(f"the broker exited:\n{broker.process.log_tail()}")
    except Exception as exc:
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, WorkloadFailed):
            result.error += "\n" + traceback.format_exc()
        if broker is not None:
            result.raw["broker_log_tail"] = broker.process.log_tail()
    finally:
        if connected:
            try:
                producers.call(list(range(n)), ("close",), 60)
            except WorkloadFailed as exc:
                result.raw["close_error"] = str(exc)
        if broker is not None:
            if args.strace:
                stop_under_strace(broker.process)
            broker.process.stop()
            broker.process.remove_log()
            stats = broker.store_stats()
            if stats is not None:
                result.raw["store_stats_at_exit"] = stats
            syncs = read_strace(os.path.join(data_dir, "strace.txt"))
            if syncs is not None and result.ok:
                calls = sum(v["calls"] for v in syncs.values())
                seconds = sum(v["seconds"] for v in syncs.values())
                published = sum(result.raw[k]["confirmed"] for k in ("one", "many"))
                published += n * (sizes["warmup"] + 1)
                result.raw["syncs"] = {**syncs, "confirmed_in_all": published}
                result.metrics["syncs_per_msg"] = calls / published
                result.metrics["sync_ms"] = seconds * 1000 / calls if calls else math.nan
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------- report

#: (key, label, unit)
METRICS = [
    ("one_per_s", "1 producer: confirmed publishes", "msg/s"),
    ("many_per_s", "{n} producers: confirmed publishes, total", "msg/s"),
    ("group_ratio", "{n} producers / 1 producer", X),
    ("one_p50_ms", "1 producer: publish latency p50", "ms"),
    ("one_p99_ms", "1 producer: publish latency p99", "ms"),
    ("many_p50_ms", "{n} producers: publish latency p50", "ms"),
    ("many_p99_ms", "{n} producers: publish latency p99", "ms"),
    ("one_cpu_ms_per_msg", "1 producer: broker CPU per message", "ms"),
    ("many_cpu_ms_per_msg", "{n} producers: broker CPU per message", "ms"),
    ("one_client_cpu_ms_per_msg", "1 producer: producer CPU per message (kombu and client, all threads)", "ms"),
    ("many_client_cpu_ms_per_msg", "{n} producers: producer CPU per message", "ms"),
    ("one_machine_busy", "1 producer: the machine's CPUs busy (all processes, others' too)", "share"),
    ("many_machine_busy", "{n} producers: the machine's CPUs busy", "share"),
    ("one_msgs_per_commit", "1 producer: messages per store commit (ours)", "msg"),
    ("many_msgs_per_commit", "{n} producers: messages per store commit (ours)", "msg"),
    ("one_ms_per_commit", "1 producer: time per store commit, BEGIN to COMMIT (ours)", "ms"),
    ("many_ms_per_commit", "{n} producers: time per store commit, BEGIN to COMMIT (ours)", "ms"),
    ("syncs_per_msg", "fsync + fdatasync calls per confirmed publish, whole run (strace)", "calls"),
    ("sync_ms", "mean wall time of one fsync or fdatasync (strace)", "ms"),
    ("one_store_busy", "1 producer: share of the time spent committing (ours)", "share"),
    ("many_store_busy", "{n} producers: share of the time spent committing (ours)", "share"),
]


def render(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    brokers = meta["brokers"]
    sizes = meta["sizes"]
    n = sizes["producers"]
    table = summarize(results, brokers, METRICS)
    fs = meta.get("filesystem", {})
    out = [f"# Durable confirmed publishes: {meta['date']}{' (quick)' if meta['quick'] else ''}", ""]
    out.append(
        f"{sizes['body']:,}-byte persistent messages to one durable queue, each publish waiting for its "
        f"confirm; 1 producer, then {n} at once (processes, one connection each); each phase "
        f"{sizes['seconds']:g} s or {sizes['messages']:,} messages per producer, whichever comes first. "
        f"{meta['repeat']} repetition(s){'; medians' if meta['repeat'] > 1 else ''}. "
        f"Data on {fs.get('type', '?')} ({fs.get('device', '?')}, mounted on {fs.get('mount', '?')}; "
        f"`df -T {fs.get('path', '?')}`). Started {meta['started_at']}, {meta['duration_s']:.0f} s in all."
    )
    if meta.get("strace"):
        out.append("")
        out.append(
            "Every server ran under `strace -f --seccomp-bpf -c -w -e trace=fsync,fdatasync`, which counted those "
            "calls. Compare the counts, not the rates: under `strace -f` a multi-threaded server (ours, RabbitMQ) "
            "is much slower, because every wake-up between its threads costs more."
        )
    if meta.get("commit_delay_ms"):
        out.append("")
        out.append(
            f"Ours only: the store slept {meta['commit_delay_ms']:g} ms after every commit "
            "(`--commit-delay-ms`), as if each sync took that much longer: what group commit does on a slower disk."
        )
    out.append("")
    header = ["metric", "unit", *(LABELS[b] for b in brokers)]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for key, label, unit in METRICS:
        row = table[key]
        if all(v is None for v in row.values()):
            continue
        cells = [label.format(n=n), unit]
        for b in brokers:
            value = row[b]
            cells.append(f"{value:.1f}{X}" if key == "group_ratio" and value is not None else fmt(value))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Rates: higher is better. Latency and CPU: lower is better. Broker CPU is user + system time of "
               "the server's process tree over the phase (psutil).")  # fmt: skip
    out.append("")

    ours = "dmb-always"
    if ours in brokers and not meta.get("strace") and not meta.get("commit_delay_ms"):  # those rates do not count
        out += ["## Against the targets of issue 12", ""]
        out.append("| target | measured | met? |")
        out.append("|---|---|---|")
        one, many = table["one_per_s"], table["many_per_s"]

        def line(target: str, value: Optional[float], text: str, ok: Optional[bool]) -> None:
            verdict = "n/a" if ok is None or value is None else ("yes" if ok else "no")
            out.append(f"| {target} | {text if value is not None else 'n/a'} | {verdict} |")

        def against_others(rates: dict, target: str) -> None:
            for other in ("rabbitmq", "redis"):
                if other not in brokers:
                    continue
                r = ratio(rates[ours], rates.get(other))
                line(
                    target.format(LABELS[other]),
                    r,
                    f"{r:.2f}{X} ({fmt(rates[ours])} vs {fmt(rates.get(other))} msg/s)" if r else "",
                    r >= 1.0 if r else None,
                )

        against_others(one, "1 producer, fsync always ≥ {}")
        r = table["group_ratio"][ours]
        per_rep = "the median of the repetitions' ratios" if meta["repeat"] > 1 else "the ratio"
        line(
            f"{n} producers ≥ 5{X} 1 producer (group commit), fsync always",
            r,
            f"{r:.2f}{X} ({per_rep}; {fmt(many[ours])} vs {fmt(one[ours])} msg/s)" if r else "",
            r >= 5.0 if r else None,
        )
        against_others(many, f"(no target) {n} producers, fsync always / {{}}")
        out.append("")

    if meta["repeat"] > 1:
        out += ["## Each repetition", "", "1 producer / " + f"{n} producers, msg/s, in the order they ran:", ""]
        for b in brokers:
            runs = [r for r in results if r["broker"] == b and r["ok"]]
            if runs:
                cells = [f"{fmt(r['metrics'].get('one_per_s'))} / {fmt(r['metrics'].get('many_per_s'))}" for r in runs]
                out.append(f"- {LABELS[b]}: " + "; ".join(cells))
        out.append("")

    notes = []
    for broker, reason in meta.get("skipped", {}).items():
        notes.append(f"- {LABELS[broker]} not run: {reason}")
    for r in results:
        label = LABELS[r["broker"]]
        if not r["ok"]:
            first = (r["error"] or "").strip().splitlines()[:3]
            what = "could not be started" if r["raw"].get("start_failed") else "failed"
            notes.append(f"- {label} repetition {r['rep'] + 1} {what}: " + " / ".join(first))
        syncs = r["raw"].get("syncs")
        if syncs:
            calls = ", ".join(f"{v['calls']:,} {k}" for k, v in syncs.items() if k in SYNC_CALLS)
            commits = (r["raw"].get("store_stats_at_exit") or {}).get("commits")
            notes.append(
                f"- {label}, repetition {r['rep'] + 1} (strace, from start to stop): {calls or 'no sync calls'} for "
                f"{syncs['confirmed_in_all']:,} confirmed publishes"
                + (f"; the store committed {commits:,} transactions" if commits is not None else "")
            )
        for key in ("one", "many"):
            phase = r["raw"].get(key) or {}
            if phase.get("purge_note"):
                notes.append(f"- {label}, {key}: {phase['purge_note']}")
            if "commits" in phase:
                notes.append(
                    f"- {label}, {phase['producers']} producer(s), repetition {r['rep'] + 1}: "
                    f"{phase['confirmed']:,} confirmed, {phase['stored']:,} in the SQLite file before the purge, "
                    f"{phase['commits']:,} commits holding {phase['synced_batches']:,} broker batches, "
                    f"{phase.get('write_s', 0):.2f} s in them over {phase['elapsed_s']:.2f} s"
                )
    if notes:
        out += ["## Notes", "", *notes, ""]

    out += ["## Setup", "", *report.setup_lines(meta)]
    out.append(
        "- brokers, one at a time, each on free loopback ports with a fresh directory under one parent: ours "
        "(`python -m django_message_broker serve --data-dir D --fsync MODE`, through "
        "`benchmarks/durable_broker.py` for the store's counters; kombu `dmb://`, `confirm_publish`), "
        "`redis-server --save '' --appendonly yes --appendfsync always --dir D` (kombu's Redis transport: a "
        "publish returns when `LPUSH` is answered, after the fsync), RabbitMQ with no plugins and Erlang "
        f"`{servers.RABBITMQ_ERL_ARGS}`, a classic durable queue (kombu's py-amqp transport, `confirm_publish`)"
    )
    out.append(f"- command: `{meta['command']}`")
    out.append("")
    return "\n".join(out)


def write(out_dir: Path, data: dict, *, latest: bool) -> list[Path]:
    meta = data["meta"]
    stem = f"{meta['date']}-durable"
    if meta.get("commit_delay_ms"):
        stem += f"-commitdelay{meta['commit_delay_ms']:g}ms"
    if meta.get("strace"):
        stem += "-strace"
    special = meta.get("strace") or meta.get("commit_delay_ms")
    stem += "-quick" if meta["quick"] else "" if meta["complete"] or special else "-partial"
    return report.write_results(out_dir, data, stem, render(data), "durable-latest.md" if latest else None)


# ----------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s phases, 4 producers (writes <date>-durable-quick.*)")
    parser.add_argument("--repeat", type=int, help="repetitions per broker (default 3, 1 with --quick; medians)")
    parser.add_argument(
        "--brokers", default=",".join(BROKERS), help="comma-separated: " + ", ".join(BROKERS + EXTRA_BROKERS)
    )
    parser.add_argument("--seconds", type=float, help="length of a phase (default 3)")
    parser.add_argument("--messages", type=int, help="most messages per producer in a phase (default 2,000)")
    parser.add_argument("--producers", type=int, help="producers of the second phase (default 16)")
    parser.add_argument(
        "--strace", action="store_true", help="count the servers' fsync and fdatasync calls (strace -f -c -w)"
    )
    parser.add_argument(
        "--commit-delay-ms",
        type=float,
        default=0.0,
        help="ours only: every commit takes this much longer (a sleep after it), as on a slower disk",
    )
    parser.add_argument("--data-root", default=None, help="parent of the data directories (default: $TMPDIR or /tmp)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only render the .md again from a saved JSON")
    args = parser.parse_args(argv)
    if args.report:
        print(render(json.loads(args.report.read_text())))
        return 0
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS + EXTRA_BROKERS]
    if unknown or not brokers:
        parser.error(f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(BROKERS + EXTRA_BROKERS)}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes: dict[str, Any] = dict(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.repeat is None:
        args.repeat = sizes.pop("repeat", 3)
    sizes.pop("repeat", None)
    custom = False
    for key in ("seconds", "messages", "producers"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
            custom = True

    exit_on_signals()
    skipped, runnable = runnable_brokers(brokers, args)
    root = tempfile.mkdtemp(prefix="bench-durable-", dir=args.data_root)
    started = time.monotonic()
    meta = run_meta(
        args,
        argv,
        sizes,
        brokers,
        skipped,
        filesystem=filesystem(root),
        strace=args.strace,
        commit_delay_ms=args.commit_delay_ms,
    )
    print(f"data under {root}: {meta['filesystem']}", flush=True)
    results: list[dict] = []
    interrupted = False
    producers: Optional[Producers] = None
    try:
        producers = Producers(sizes["producers"])
        for rep in range(args.repeat):
            shift = rep % max(1, len(runnable))
            for broker in runnable[shift:] + runnable[:shift]:  # rotate to spread order effects
                print(f"rep {rep + 1}/{args.repeat} {broker:<13}", end=" ", flush=True)
                t0 = time.monotonic()
                result = run_broker(broker, rep, args, sizes, producers, root)
                shown = ", ".join(f"{k}={fmt(v)}" for k, v in result.metrics.items())
                status = "ok" if result.ok else "FAIL: " + (result.error or "").strip().splitlines()[0][:300]
                print(f"{shown} {status} ({time.monotonic() - t0:.1f}s)", flush=True)
                results.append(result.__dict__)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        if producers is not None:
            producers.close()
        servers.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    complete = brokers == BROKERS and not custom and not args.strace and not args.commit_delay_ms
    return finish_run(args, meta, results, started, interrupted, complete, write, render)


if __name__ == "__main__":
    sys.exit(main())
