"""Prometheus metrics (issue #13 item 2): ``serve --metrics-port`` serves the
text exposition format on loopback, with per-channel series bounded to the
top N channels and the rest summed under ``channel="__other__"``."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import pytest

from django_message_broker import SyncClient, metrics
from django_message_broker.__main__ import main
from helpers import free_port, wait_for

pytestmark = pytest.mark.timeout(60)
pytest.importorskip("prometheus_client", reason="the metrics extra: pip install -e '.[metrics]'")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of metric ``name`` (``""`` for no labels)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def test_top_channels_and_the_rest_summed(broker):
    exporter = metrics.start(lambda top: broker.server.stats(top), 0, top=5)
    try:
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        with SyncClient(broker.address) as client:
            for i in range(12):
                for _ in range(i + 1):
                    client.send(f"metrics.ch{i:02d}", b"x")
            text = scrape(exporter.url)
    finally:
        exporter.close()
    queued = samples(text, "dmb_messages_queued")
    assert set(queued) == {f'channel="metrics.ch{i:02d}"' for i in range(7, 12)} | {'channel="__other__"'}
    assert queued['channel="metrics.ch11"'] == 12
    assert queued['channel="__other__"'] == sum(range(1, 8))
    assert sum(queued.values()) == sum(range(1, 13))
    assert samples(text, "dmb_messages_enqueued_total") == {"": sum(range(1, 13))}
    assert samples(text, "dmb_up") == {"": 1.0}
    assert set(samples(text, "dmb_messages_refused_total")) == {'reason="full"', 'reason="memory"'}
    assert "# TYPE dmb_messages_delivered_total counter" in text
    assert "process_resident_memory_bytes" in text or sys.platform != "linux"


def test_a_stopped_broker_scrapes_as_down(broker):
    def gone(top: int) -> dict:
        raise TimeoutError("the broker is not running")

    exporter = metrics.start(gone, 0)
    try:
        assert samples(scrape(exporter.url), "dmb_up") == {"": 0.0}
    finally:
        exporter.close()


def test_serve_with_metrics_port_on_loopback():
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "django_message_broker", "serve", "--bind", f"tcp://127.0.0.1:{port}",
         "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def up() -> str:
            try:
                return scrape(url)
            except OSError:
                return ""

        text = wait_for(up, 20, "the metrics endpoint")
        assert samples(text, "dmb_clients") == {"": 0.0}
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=20)
    assert f"metrics on {url}" in out
    assert process.returncode == 0, out


def test_a_metrics_port_in_use_is_a_clear_error():
    exporter = metrics.start(lambda top: {}, 0)
    try:
        with pytest.raises(metrics.MetricsError, match=f"cannot serve metrics on 127.0.0.1:{exporter.port}"):
            metrics.start(lambda top: {}, exporter.port)
    finally:
        exporter.close()


def test_without_the_extra_serve_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    assert main(["serve", "--bind", f"tcp://127.0.0.1:{free_port()}", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'metrics' extra" in err and 'pip install "django-message-broker[metrics]"' in err
