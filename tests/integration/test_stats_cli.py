"""``python -m django_message_broker stats`` (issue #13 item 2), as a user
runs it: a subprocess against a real broker on a free port."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from django_message_broker import SyncClient
from django_message_broker.stats_view import format_bytes, format_duration
from helpers import free_port

pytestmark = pytest.mark.timeout(60)


def stats(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "django_message_broker", "stats", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_text_and_json_name_the_channels(broker):
    with SyncClient(broker.address) as client:
        for _ in range(4):
            client.send("cli.waiting", b"x")
        text = stats("--address", broker.address)
        as_json = stats("--address", broker.address, "--json", "--top", "3")
    assert text.returncode == 0, text.stderr
    assert "cli.waiting" in text.stdout and "CHANNEL" in text.stdout and "PROCESS" in text.stdout
    detail = json.loads(as_json.stdout)
    assert detail["top"] == 3
    [row] = detail["channels"]
    assert (row["name"], row["queued"]) == ("cli.waiting", 4)


def test_watch_refreshes_count_times_as_json_lines(broker):
    done = stats("--address", broker.address, "--watch", "--json", "--count", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert second["totals"]["uptime"] > first["totals"]["uptime"]


def test_no_broker_is_a_clear_error_and_exit_1():
    address = f"tcp://127.0.0.1:{free_port()}"
    done = stats("--address", address, "--timeout", "0.5")
    assert done.returncode == 1
    assert done.stderr.strip() == f"no broker answered at {address} within 0.5s"
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_formats():
    assert format_duration(12.34) == "12.3s"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(90061) == "1d01h01m"
    assert (format_bytes(None), format_bytes(512), format_bytes(1536)) == ("?", "512 bytes", "1.5 KiB")
    assert format_bytes(3 << 30) == "3.0 GiB"
