#!/usr/bin/env python
"""Run the benchmarks: ``python benchmarks/run.py [--quick] [--repeat N]
[--only SCENARIO[,...]] [--layers a,b]``.

Starts its own redis-server, our broker and the bare pyzmq relay on free
loopback ports, runs every scenario for every layer that it applies to
(layers interleaved within each repetition, their order rotated between
repetitions), and writes benchmarks/results/<date>.{json,md,png} plus
latest.{md,png}. ``--quick`` uses tiny sizes and writes <date>-quick.*
only. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that ``benchmarks`` imports, here and in spawned workers
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import datetime as dt
    import json
    import os
    import shutil
    import signal
    import time
    import traceback

    from benchmarks import report, servers
    from benchmarks.layers import BY_NAME as LAYERS
    from benchmarks.layers import FACTORIES, Servers
    from benchmarks.scenarios import (
        ALIASES,
        DEFAULT_SIZES,
        QUICK_SIZES,
        SCENARIOS,
        Env,
        Outcome,
        RunFailed,
        spawn_context,
    )
    from benchmarks.scenarios import (
        BY_NAME as SCENARIOS_BY_NAME,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test of the harness (writes <date>-quick.*)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per scenario and layer (default 3; medians)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios, by name or number: "
        + ", ".join(f"{s.number}={s.name}" for s in SCENARIOS)
        + ", 7=cpu",
    )
    parser.add_argument("--layers", default="", help="comma-separated layers: " + ", ".join(LAYERS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary")
    parser.add_argument(
        "--report", type=Path, metavar="JSON", help="only render the .md and .png again from a saved results JSON"
    )
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())["meta"]
        for written in report.rewrite(args.report, latest=saved.get("complete", True) and not saved["quick"]).values():
            print(f"wrote {written}")
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    scenarios = SCENARIOS
    if args.only:
        names = []
        for word in filter(None, (w.strip() for w in args.only.split(","))):
            name = ALIASES.get(word, word)
            if name not in SCENARIOS_BY_NAME:
                parser.error(f"unknown scenario {word!r}")
            names.append(name)
        scenarios = [s for s in SCENARIOS if s.name in names]
    factories = FACTORIES
    if args.layers:
        wanted = [w.strip() for w in args.layers.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in LAYERS]
        if unknown:
            parser.error(f"unknown layer(s) {', '.join(unknown)}; choose from {', '.join(LAYERS)}")
        factories = [f for f in FACTORIES if f.name in wanted]
    skipped_layers: dict[str, str] = {}
    for factory in factories:
        reason = factory.available()
        if reason is None and "redis" in factory.needs and not shutil.which(args.redis_server):
            reason = f"{args.redis_server} not found"
        if reason:
            skipped_layers[factory.name] = reason
            print(f"skipping layer {factory.name}: {reason}", file=sys.stderr)
    runnable = [f for f in factories if f.name not in skipped_layers]
    needed = {need for f in runnable for s in scenarios if f.supports(s.name) for need in f.needs}

    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES

    def stop_on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)

    started = time.monotonic()
    meta = {
        "date": dt.date.today().isoformat(),
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeat": args.repeat,
        "scenarios": [s.name for s in scenarios],
        "layers": [f.name for f in runnable],
        "skipped_layers": skipped_layers,
        "loadavg_start": os.getloadavg(),
        "machine": report.machine_info(args.redis_server),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    processes: dict[str, servers.ServerProcess] = {}
    server_info = Servers()

    def start(name: str) -> None:
        if name == "redis":
            processes["redis"], server_info.redis_port = servers.redis_server(args.redis_server)
        elif name == "broker":
            processes["broker"], server_info.broker_address = servers.broker_server()
        elif name == "relay":
            processes["relay"], server_info.relay_address = servers.relay_server()

    records: list[dict] = []
    total = sum(args.repeat for s in scenarios for f in runnable if f.supports(s.name))
    done = 0
    interrupted = False
    try:
        for name in sorted(needed):
            start(name)
            print(f"started {name} (pid {processes[name].pid})", flush=True)
        env = Env(spawn_context(), server_info, processes)
        skip: set[tuple[str, str]] = set()
        for scenario in scenarios:
            layers = [f for f in runnable if f.supports(scenario.name)]
            for rep in range(args.repeat):
                shift = rep % max(1, len(layers))
                for factory in layers[shift:] + layers[:shift]:  # rotate to spread order effects
                    done += 1
                    prefix = (
                        f"[{done:3d}/{total}] {scenario.number}.{scenario.name:<10} "
                        f"rep {rep + 1}/{args.repeat} {factory.name:<8}"
                    )
                    if (scenario.name, factory.name) in skip:
                        print(f"{prefix} skipped (an earlier repetition timed out)", flush=True)
                        records.append(
                            {
                                "scenario": scenario.name,
                                "layer": factory.name,
                                "rep": rep,
                                "ok": False,
                                "skipped": True,
                                "error": "skipped: an earlier repetition timed out",
                                "metrics": {},
                                "check": {},
                                "raw": {},
                            }
                        )
                        continue
                    print(prefix, end=" ", flush=True)
                    t0 = time.monotonic()
                    try:
                        outcome = scenario.run(env, factory, sizes[scenario.name])
                    except RunFailed as exc:
                        outcome = Outcome(error=str(exc), timed_out=exc.timed_out)
                    except Exception as exc:
                        outcome = Outcome(error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                    wall = time.monotonic() - t0
                    try:
                        env.cleanup(factory)
                    except Exception as exc:
                        print(f"(cleanup failed: {exc})", end=" ")
                    for need in factory.needs:  # a server that died is reported and restarted
                        if not processes[need].alive():
                            tail = processes[need].log_tail()
                            outcome.error = (outcome.error or "") + f"\n{need} died during the run:\n{tail}"
                            processes[need].stop()
                            start(need)
                    if outcome.timed_out:
                        skip.add((scenario.name, factory.name))
                    records.append(
                        {
                            "scenario": scenario.name,
                            "layer": factory.name,
                            "rep": rep,
                            "ok": outcome.ok,
                            "wall_s": round(wall, 3),
                            "metrics": outcome.metrics,
                            "check": outcome.check,
                            "error": outcome.error,
                            "raw": outcome.raw,
                        }
                    )
                    shown = ", ".join(f"{k}={report.fmt(v)}" for k, v in outcome.metrics.items())
                    status = "ok" if outcome.ok else "FAIL: " + (outcome.error or "").strip().splitlines()[0][:200]
                    print(f"{shown} {status} ({wall:.1f}s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        for path in servers.stop_all(keep_logs=any(not r["ok"] and not r.get("skipped") for r in records)):
            print(f"server log kept: {path}", file=sys.stderr)

    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["interrupted"] = interrupted
    if not records:
        print("nothing was run", file=sys.stderr)
        return 1
    complete = not interrupted and not args.only and not args.layers
    meta["complete"] = complete
    paths = report.write(
        args.out, meta, sizes, records, FACTORIES if not args.layers else factories, latest=complete and not args.quick
    )
    print()
    print(paths["md"].read_text())
    for written in paths.values():
        print(f"wrote {written}")
    print(f"total {meta['duration_s'] / 60:.1f} min")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
