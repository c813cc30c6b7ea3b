"""Results: the raw JSON, the Markdown table, the PNG chart."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .layers import OURS, REFERENCE, LayerFactory
from .scenarios import METRICS, Metric

PACKAGES = [
    "django-message-broker",
    "channels",
    "channels_redis",
    "Django",
    "asgiref",
    "redis",
    "pyzmq",
    "msgspec",
    "psutil",
    "matplotlib",
]


# ------------------------------------------------------------------ machine


def setup_lines(meta: dict[str, Any]) -> list[str]:
    """The machine, versions, commit and load lines of a report's Setup
    section (``meta["machine"]`` as ``machine_info`` and the harnesses fill it)."""
    machine = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)
    return [
        f"- {machine.get('cpu_model', '?')}, {machine.get('logical_cores')} logical cores, "
        f"{machine.get('memory_gib')} GiB; {machine.get('os')}; Python {machine.get('python')}",
        f"- {versions}",
        f"- git {machine.get('git_commit')}; load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end",
    ]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def package_versions(names: Any) -> dict[str, Optional[str]]:
    """Installed versions of ``names`` (None for one that is not installed)."""
    from importlib import metadata

    versions: dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_results(out_dir: Path, data: dict, stem: str, text: str, latest: Optional[str]) -> list[Path]:
    """``<stem>.json`` and ``<stem>.md`` in ``out_dir``, and the Markdown
    also as ``latest`` if given; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    paths[1].write_text(text)
    if latest:
        paths.append(out_dir / latest)
        paths[-1].write_text(text)
    return paths


def machine_info(redis_binary: Optional[str]) -> dict[str, Any]:
    cpu = cpu_model()
    versions = package_versions(PACKAGES)
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    if redis_binary and shutil.which(redis_binary):
        out = subprocess.run([redis_binary, "--version"], capture_output=True, text=True, check=False).stdout
        versions["redis-server"] = out.split("v=")[1].split()[0] if "v=" in out else out.strip()
    import psutil

    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "versions": versions,
        "git_commit": commit,
    }


# ------------------------------------------------------------------ summary


def _median_cell(records: list[dict], layer: str, metric: Metric) -> dict[str, Any]:
    mine = [r for r in records if r["layer"] == layer and r["scenario"] == metric.scenario]
    values = [r["metrics"][metric.key] for r in mine if r["ok"] and metric.key in r["metrics"]]
    cell: dict[str, Any] = {
        "runs": len(mine),
        "ok": sum(1 for r in mine if r["ok"]),
        "values": values,
        "median": statistics.median(values) if values else None,
    }
    if values and len(values) > 1:
        cell["min"], cell["max"] = min(values), max(values)
    return cell


def summarize(records: list[dict], factories: list[LayerFactory], sizes: dict) -> list[dict]:
    rows = []
    ran = {r["scenario"] for r in records}
    for metric in METRICS:
        if metric.scenario not in ran:
            continue
        cells: dict[str, Any] = {}
        for factory in factories:
            if not metric.applies(factory):
                cells[factory.name] = None
                continue
            cells[factory.name] = _median_cell(records, factory.name, metric)
        ours = (cells.get(OURS) or {}).get("median")
        ref = (cells.get(REFERENCE) or {}).get("median")
        rows.append(
            {
                "scenario": metric.scenario,
                "metric": metric.key,
                "label": metric.label(sizes),
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "cells": cells,
                "ratio_ours_to_reference": (ours / ref) if ours is not None and ref else None,
            }
        )
    return rows


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _cell_text(cell: Optional[dict]) -> str:
    if cell is None:
        return "n/a"
    if cell["runs"] == 0:
        return "not run"
    if cell["median"] is None:
        return "FAILED"
    text = fmt(cell["median"])
    if cell["ok"] < cell["runs"]:
        text += f" ({cell['runs'] - cell['ok']}/{cell['runs']} failed)"
    return text


def markdown(meta: dict, rows: list[dict], records: list[dict], factories: list[LayerFactory]) -> str:
    m = meta["machine"]
    v = m["versions"]
    lines = [
        f"# Benchmarks {meta['date']}{' (quick)' if meta['quick'] else ''}",
        "",
        f"Median of {meta['repeat']} repetitions; layers interleaved within each repetition. "
        f"Run took {meta['duration_s'] / 60:.1f} min.",
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, {m['os']}; "
        f"load average {meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end "
        "(other work shares this machine).",
        f"Python {m['python']}; django-message-broker {v.get('django-message-broker')} "
        f"(commit {m.get('git_commit')}), "
        f"channels {v.get('channels')}, channels_redis {v.get('channels_redis')}, redis-py {v.get('redis')}, "
        f"Redis {v.get('redis-server')}, pyzmq {v.get('pyzmq')} (libzmq {v.get('libzmq')}), "
        f"msgspec {v.get('msgspec')}.",
        "",
    ]
    if meta.get("skipped_layers"):
        for name, reason in meta["skipped_layers"].items():
            lines.append(f"**Layer `{name}` not run:** {reason}.")
        lines.append("")
    names = [f.name for f in factories]
    header = ["scenario", "unit", "better"] + [f.name for f in factories] + [f"ratio {OURS}/{REFERENCE}"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(names) + 1)) + "|")
    for row in rows:
        ratio = row["ratio_ours_to_reference"]
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        better = "higher" if row["higher_is_better"] else "**lower**"
        cells = [_cell_text(row["cells"].get(n)) for n in names]
        lines.append("| " + " | ".join([row["label"], row["unit"], better, *cells, ratio_text]) + " |")
    lines += [
        "",
        f"Ratio = {OURS} median / {REFERENCE} median. "
        "For msg/s, deliveries/s, calls/s and MB/s above 1 means ours is faster; "
        "for latency (ms), memory (MB) and CPU seconds **lower is better**, so below 1 means ours is better.",
        "",
        "Layers: " + "; ".join(f"`{f.name}` = {f.label}" + (f" ({f.note})" if f.note else "") for f in factories) + ".",
        "n/a: the scenario does not apply to that layer. FAILED: no repetition passed its checks (see below).",
        "",
    ]
    failures = [r for r in records if not r["ok"]]
    if failures:
        lines.append("## Failed repetitions")
        lines.append("")
        for r in failures:
            error = (r["error"] or "").strip().splitlines()
            lines.append(f"- {r['scenario']} / {r['layer']} / rep {r['rep'] + 1}: {error[0] if error else '?'}")
        lines.append("")
    return "\n".join(lines)


def chart(rows: list[dict], factories: list[LayerFactory], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    others = [f for f in factories if f.name != REFERENCE]
    labels: list[str] = []
    series: dict[str, list[Optional[float]]] = {f.name: [] for f in others}
    for row in rows:
        ref_cell = row["cells"].get(REFERENCE)
        ref = ref_cell and ref_cell["median"]
        if not ref:
            continue
        labels.append(row["label"] + ("" if row["higher_is_better"] else " (lower is better)"))
        for f in others:
            cell = row["cells"].get(f.name)
            value = cell and cell["median"]
            advantage = None
            if value:
                advantage = value / ref if row["higher_is_better"] else ref / value
            series[f.name].append(advantage)
    if not labels:
        return False
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    height = 1.5 + len(labels) * (0.25 + 0.12 * max(1, len(series)))
    fig, ax = plt.subplots(figsize=(12, height))
    bar = 0.8 / max(1, len(series))
    colors = {"ours": "#1f77b4", "pubsub": "#ff7f0e", "inmemory": "#2ca02c", "zmq": "#7f7f7f"}
    for i, (name, values) in enumerate(series.items()):
        ys = [y + (i - (len(series) - 1) / 2) * bar for y in range(len(labels))]
        xs = [x if x is not None else 0 for x in values]
        ax.barh(ys, xs, height=bar, label=name, color=colors.get(name))
        for y, x in zip(ys, values, strict=True):
            if x is not None:
                ax.text(x, y, f" {x:.0f}x" if x >= 10 else f" {x:.2g}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"times better than {REFERENCE} (RedisChannelLayer), median; >1 = better, log scale")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(right=max(x for v in series.values() for x in v if x is not None) * 4)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(
    out_dir: Path,
    meta: dict,
    sizes: dict,
    records: list[dict],
    factories: list[LayerFactory],
    *,
    latest: bool,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, factories, sizes)
    # A quick, partial (--only/--layers) or interrupted run never overwrites the day's full results.
    stem = meta["date"] + ("-quick" if meta["quick"] else "") + ("" if meta.get("complete", True) else "-partial")
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    document = {
        "meta": meta,
        "sizes": sizes,
        "layers": {f.name: {"label": f.label, "path": f.path, "note": f.note} for f in factories},
        "summary": rows,
        "runs": records,
    }
    paths["json"].write_text(json.dumps(document, indent=1, default=_jsonable) + "\n")
    text = markdown(meta, rows, records, factories)
    paths["md"].write_text(text + "\n")
    made_chart = chart(rows, factories, paths["png"], f"Benchmarks {meta['date']}{' (quick)' if meta['quick'] else ''}")
    if not made_chart:
        paths.pop("png")
    if latest:
        shutil.copyfile(paths["md"], out_dir / "latest.md")
        if made_chart:
            shutil.copyfile(paths["png"], out_dir / "latest.png")
    return paths


def rewrite(json_path: Path, *, latest: bool) -> dict[str, Path]:
    """Render the Markdown and the chart again from a saved JSON."""
    from .layers import BY_NAME

    document = json.loads(json_path.read_text())
    factories = [BY_NAME[name] for name in document["layers"] if name in BY_NAME]
    return write(json_path.parent, document["meta"], document["sizes"], document["runs"], factories, latest=latest)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)
