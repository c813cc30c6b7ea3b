"""The kombu transport's connections in the broker's stats (issue #13): they
say who they are in Hello, and the task queues' counters reach the detailed
stats, the terminal view and the Prometheus metrics."""

from __future__ import annotations

import os

import pytest
from celery_helpers import dmb_url
from kombu import Connection, Exchange, Producer, Queue

import django_message_broker.celery  # noqa: F401 - registers the dmb:// scheme
from django_message_broker import SyncClient
from django_message_broker.metrics import BrokerCollector
from django_message_broker.stats_view import format_stats
from helpers import BrokerThread

pytestmark = pytest.mark.timeout(30)


def test_a_kombu_connection_names_its_process_and_its_queues_count(task_broker: BrokerThread) -> None:
    with Connection(dmb_url(task_broker.address)) as conn:
        exchange = Exchange("stats-ex", type="direct")
        queue = Queue("stats-q", exchange, routing_key="k")
        with conn.channel() as channel:
            queue(channel).declare()
            Producer(channel).publish({"n": 1}, exchange=exchange, routing_key="k", declare=[queue])
            with SyncClient(task_broker.address) as client:
                detail = client.stats(top=10)
    pids = [c["pid"] for c in detail["clients"]]
    assert pids.count(os.getpid()) == 2, detail["clients"]  # the kombu connection and the stats client
    totals = detail["totals"]
    assert (totals["task_queues"], totals["task_ready"]) == (1, 1)
    assert "task queues 1  ready 1" in format_stats(detail)
    names = [family.name for family in BrokerCollector(lambda top: detail).collect()]
    assert {"dmb_task_queues", "dmb_task_messages_ready", "dmb_task_unroutable"} <= set(names)
