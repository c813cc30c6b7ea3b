"""The terminal view of a broker's stats: ``python -m django_message_broker
stats`` and ``manage.py brokerstats`` (issue #13 item 2).

``format_stats`` turns the detailed answer of ``Stats(top=N)`` into plain
text, a ``top``-like screen; ``run`` asks a broker once or every second
(``watch``) and prints that, or JSON for scripts (one object per line when
watching). A broker that does not answer within ``timeout`` is an error
message and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, TextIO

from .exceptions import AuthenticationFailed, BrokerUnavailable

__all__ = ["format_bytes", "format_duration", "format_stats", "run"]

_CLEAR = "\x1b[H\x1b[2J"
_COLUMNS = ("queued", "held", "receivers", "enqueued", "delivered", "expired", "refused_full")
_HEADINGS = ("QUEUED", "HELD", "RECV", "ENQUEUED", "DELIVERED", "EXPIRED", "REFUSED")


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; under a minute, ``"12.3s"``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def format_bytes(value: Any) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"?"``."""
    if value is None:
        return "?"
    size = float(value)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


_size = format_bytes


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_stats(detail: dict[str, Any], address: str = "") -> str:
    """A screenful of plain text from ``stats(top=N)``'s answer."""
    t = detail["totals"]
    rates = t.get("rates", {})
    lines = [
        f"django-message-broker {t.get('version') or '?'} at {address or '?'}  instance {t['instance']}  "
        f"up {format_duration(t.get('uptime', 0))}  RSS {_size(t.get('rss'))}",
        f"clients {t['clients']}  channels {t['queues']}  queued {t['queued']} "
        f"({_size(t.get('queued_bytes', t['memory']))} of {_size(t['max_memory'])})  held {t['held']}  "
        f"groups {t['groups']} ({t['memberships']} members)",
        f"in {rates.get('messages_in', 0):,.1f} msg/s  out {rates.get('delivered', 0):,.1f} msg/s  "
        f"{_size(round(rates.get('bytes_in', 0)))}/s   since start: enqueued {t.get('enqueued', 0)}  "
        f"delivered {t['delivered']}  expired {t['expired']}  refused {t['refused_full']} full, "
        f"{t['refused_memory']} memory  errors {t['errors']}",
    ]
    if t.get("task_queues"):
        lines.append(
            f"task queues {t['task_queues']}  ready {t['task_ready']}  unacked {t['task_unacked']}  "
            f"consumers {t['task_consumers']}  unroutable {t['task_unroutable']}"
        )
    lines += ["", f"{'CHANNEL':<40} " + " ".join(f"{h:>9}" for h in _HEADINGS)]
    for row in detail["channels"]:
        lines.append(f"{_cut(row['name'], 40):<40} " + " ".join(f"{row[c]:>9}" for c in _COLUMNS))
    other = detail.get("other_channels") or {}
    if other.get("channels"):
        label = f"({other['channels']} more channels)"
        lines.append(f"{label:<40} " + " ".join(f"{other[c]:>9}" for c in _COLUMNS))
    if not detail["channels"]:
        lines.append("(no channels)")
    heading = f"{'CLIENT':<10} {'HOST':<20} {'PID':>7} {'CONNECTED':>10} {'CH':>4} {'CREDIT':>7} {'HELD':>6}  PROCESS"
    lines += ["", heading]
    for c in detail["clients"]:
        lines.append(
            f"{_cut(c['id'], 10):<10} {_cut(c['host'] or '?', 20):<20} {c['pid'] or '?':>7} "
            f"{format_duration(c['connected']):>10} {c['channels']:>4} {c['credit']:>7} {c['held']:>6}  "
            f"{_cut(c['name'] or '?', 60)}"
        )
    if detail.get("other_clients"):
        lines.append(f"({detail['other_clients']} more clients)")
    return "\n".join(lines)


def run(
    address: str,
    *,
    watch: bool = False,
    as_json: bool = False,
    top: int = 20,
    count: Optional[int] = None,
    timeout: float = 3.0,
    interval: float = 1.0,
    server_key: Optional[str] = None,
    client_key: Optional[str] = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Ask the broker at ``address`` for its stats and print them: once, or
    every ``interval`` seconds with ``watch`` (``count`` times, or until
    Ctrl-C). Returns the exit status: 0, or 1 when no broker answered within
    ``timeout`` (or it refused this client's key)."""
    from .client import SyncClient

    try:
        client = SyncClient(address, timeout=timeout, server_key=server_key, client_key=client_key)
    except (OSError, ValueError, TypeError) as exc:  # a bad address or key file
        print(f"cannot ask {address}: {exc}", file=err)
        return 1
    shown = 0
    clear = watch and not as_json and out.isatty()
    try:
        while True:
            started = time.monotonic()
            detail = client.stats(top=top)
            if as_json:
                out.write(json.dumps(detail, separators=(",", ":")) if watch else json.dumps(detail, indent=2))
                out.write("\n")
            else:
                out.write((_CLEAR if clear else "") + format_stats(detail, address) + "\n")
                if watch and not clear:
                    out.write("\n")
            out.flush()
            shown += 1
            if not watch or (count is not None and shown >= count):
                return 0
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except BrokerUnavailable:
        print(f"no broker answered at {address} within {timeout:g}s", file=err)
        return 1
    except AuthenticationFailed as exc:
        print(f"the broker at {address} refused this client: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # | head: stop quietly (Python's own advice: no flush error at exit)
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        client.close()
