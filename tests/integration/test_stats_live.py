"""Stats over real ZeroMQ (issue #13 item 1): a client's process reaches the
broker in its Hello, ``stats(top=N)`` answers the detailed form, and the
server answers ``BrokerServer.stats`` from another thread (the metrics
exporter's)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from django_message_broker import SyncClient, __version__
from django_message_broker._process import process_name

pytestmark = pytest.mark.timeout(30)


def test_detailed_stats_name_this_process_and_its_channel(broker):
    with SyncClient(broker.address) as client:
        for _ in range(3):
            client.send("stats.live", b"x" * 10)
        detail = client.stats(top=5)
        flat = client.stats()
    assert flat["queued"] == 3 and "channels" not in flat
    [row] = detail["channels"]
    assert (row["name"], row["queued"], row["enqueued"]) == ("stats.live", 3, 3)
    [me] = detail["clients"]
    assert (me["host"], me["pid"], me["name"]) == (socket.gethostname(), os.getpid(), process_name())
    totals = detail["totals"]
    assert totals["version"] == __version__
    assert totals["rss"] > 1 << 20
    assert totals["queued_bytes"] == 3 * (10 + 128)


def test_bad_top_is_refused_in_the_caller(broker):
    with SyncClient(broker.address) as client:
        with pytest.raises(ValueError):
            client.stats(top=-1)
        with pytest.raises(TypeError):
            client.stats(top="5")  # type: ignore[arg-type]


def test_server_stats_from_another_thread(broker):
    with SyncClient(broker.address) as client:
        client.send("stats.thread", b"x")
        results: list = []
        thread = threading.Thread(target=lambda: results.append(broker.server.stats(top=3, timeout=5)))
        thread.start()
        thread.join(10)
    [detail] = results
    assert [row["name"] for row in detail["channels"]] == ["stats.thread"]
    assert broker.server.stats()["queued"] == 1


def test_process_name_is_short_and_readable():
    assert process_name(["/srv/site/manage.py", "runworker", "jobs"]) == "manage.py runworker jobs"
    assert process_name(["/x/django_message_broker/__main__.py", "stats"]) == "python -m django_message_broker stats"
    assert len(process_name(["prog", "a" * 500])) == 120


def test_server_stats_when_not_running_is_a_timeout_error():
    from django_message_broker import BrokerServer

    with pytest.raises(TimeoutError, match="not running"):
        BrokerServer("tcp://127.0.0.1:0").stats()
