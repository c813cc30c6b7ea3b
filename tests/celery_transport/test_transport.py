"""The kombu transport against a real broker: routing shared by every
connection, broker-side acks and prefetch, redelivery when a consumer's
connection goes, and the errors kombu and Celery expect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from celery_helpers import dmb_url
from kombu import Connection, Consumer, Exchange, Producer, Queue

import django_message_broker.celery as transport
from django_message_broker.exceptions import MessageTooLarge, QueueFull
from helpers import BrokerThread, free_port, wait_for


@pytest.fixture
def url(task_broker: BrokerThread) -> str:
    return dmb_url(task_broker.address)


def drain(conn: Connection, got: list, count: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(got)} of {count} messages"
        try:
            conn.drain_events(timeout=left)
        except TimeoutError:
            pass
    return got


def collect(got: list, ack: bool = True) -> Any:
    def on_message(body: Any, message: Any) -> None:
        got.append((body, message))
        if ack:
            message.ack()

    return on_message


def test_the_scheme_is_registered() -> None:
    from kombu.transport import resolve_transport

    assert resolve_transport("dmb") is transport.Transport
    assert Connection("dmb://127.0.0.1:1").transport_cls == "dmb"


@pytest.mark.parametrize(
    "url, address, vhost",
    [
        ("dmb://", None, "/"),
        ("dmb://127.0.0.1:7000", "tcp://127.0.0.1:7000", "/"),
        ("dmb://broker.internal:7000/site-a", "tcp://broker.internal:7000", "site-a"),
        ("dmb://[::1]:7000", "tcp://[::1]:7000", "/"),
        ("ipc:///run/dmb.sock", "ipc:///run/dmb.sock", "/"),
        ("dmb://example.org", "tcp://example.org:5556", "/"),
    ],
)
def test_urls(url: str, address: str, vhost: str) -> None:
    assert transport._address_of(url, {}) == (address, vhost)


def test_routing_lives_in_the_broker(url: str) -> None:
    """A queue declared on one connection gets what another connection
    publishes to a direct, topic or fanout exchange, or to the default one
    (kombu's virtual transports route inside each process)."""
    direct = Exchange("jobs", "direct")
    topic = Exchange("events", "topic")
    fanout = Exchange("broadcast", "fanout")
    queues = [
        Queue("jobs.a", direct, routing_key="a"),
        Queue("ev.task", topic, routing_key="task.#"),
        Queue("ev.any", topic, routing_key="#"),
        Queue("bc.1", fanout),
        Queue("bc.2", fanout),
    ]
    with Connection(url) as consumer_conn, Connection(url) as producer_conn:
        got: list = []
        with Consumer(consumer_conn, queues, callbacks=[collect(got)]):
            producer = Producer(producer_conn.channel())
            producer.publish({"n": 1}, exchange=direct, routing_key="a")
            producer.publish({"n": 2}, exchange=direct, routing_key="b")  # unroutable: dropped
            producer.publish({"n": 3}, exchange=topic, routing_key="task.succeeded")
            producer.publish({"n": 4}, exchange=topic, routing_key="worker.heartbeat")
            producer.publish({"n": 5}, exchange=fanout, routing_key="")
            producer.publish({"n": 6}, exchange="", routing_key="jobs.a")
            drain(consumer_conn, got, 7)
            routed = sorted((m.delivery_info["routing_key"], body["n"]) for body, m in got)
            assert routed == [
                ("", 5), ("", 5), ("a", 1), ("jobs.a", 6),
                ("task.succeeded", 3), ("task.succeeded", 3), ("worker.heartbeat", 4),
            ]  # fmt: skip
            with pytest.raises(TimeoutError):  # and nothing more: the unroutable one is gone
                consumer_conn.drain_events(timeout=0.2)


def test_priorities_run_nine_first(url: str) -> None:
    queue = Queue("prio", Exchange("prio"), routing_key="prio")
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for n, priority in enumerate([0, 9, 5, 9, 0, 3, 15, -2]):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="prio", priority=priority, declare=[queue])
        got: list = []
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            drain(conn, got, 8)
        # 9 first (15 counts as 9, -2 as 0), FIFO within a level
        assert [body["n"] for body, _ in got] == [1, 3, 6, 2, 5, 0, 4, 7]


def test_prefetch_is_per_channel_and_changes_at_run_time(url: str) -> None:
    queue = Queue("work", routing_key="work")
    with Connection(url) as conn, Connection(url) as other:
        producer = Producer(conn.channel())
        for n in range(10):
            producer.publish({"n": n}, routing_key="work", declare=[queue])
        held: list = []
        channel = conn.channel()
        consumer = Consumer(channel, [queue], callbacks=[collect(held, ack=False)])
        consumer.qos(prefetch_count=2)
        consumer.consume()
        drain(conn, held, 2)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)
        assert len(held) == 2
        # Another consumer gets the rest while these two are held.
        rest: list = []
        with Consumer(other, [queue], callbacks=[collect(rest)]):
            drain(other, rest, 8)
        # Celery raises prefetch for ETA tasks: the broker follows at once.
        producer.publish({"n": 10}, routing_key="work")
        producer.publish({"n": 11}, routing_key="work")
        consumer.qos(prefetch_count=4)
        drain(conn, held, 4)
        assert sorted(body["n"] for body, _ in held) == [0, 1, 10, 11]
        for _, message in held:
            message.ack()
        assert channel.queue_declare("work", passive=True).message_count == 0


def test_unacked_messages_come_back_when_the_channel_or_connection_closes(url: str) -> None:
    queue = Queue("back", routing_key="back")
    with Connection(url) as conn:
        Producer(conn.channel()).publish({"n": 1}, routing_key="back", declare=[queue])
    for close in ("channel", "connection"):
        held: list = []
        conn = Connection(url)
        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[collect(held, ack=False)]):
            drain(conn, held, 1)
        channel.close() if close == "channel" else conn.close()
        with Connection(url) as again:
            got: list = []
            with Consumer(again, [queue], callbacks=[collect(got)]):
                drain(again, got, 1)
            message = got[0][1]
            assert got[0][0] == {"n": 1} and message.delivery_info["redelivered"] is True
            Producer(again.channel()).publish({"n": 1}, routing_key="back")  # for the next round
        conn.close()


def test_reject_requeue_and_recover(url: str) -> None:
    queue = Queue("rj", routing_key="rj")
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        producer.publish({"n": 1}, routing_key="rj", declare=[queue])
        producer.publish({"n": 2}, routing_key="rj")
        got: list = []
        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[collect(got, ack=False)]):
            drain(conn, got, 2)
            got[0][1].reject(requeue=True)
            drain(conn, got, 3)
            assert got[2][0] == {"n": 1} and got[2][1].delivery_info["redelivered"]
            got[1][1].reject(requeue=False)  # dropped
            channel.basic_recover(requeue=True)  # n=1 again
            drain(conn, got, 4)
            assert got[3][0] == {"n": 1}
            got[3][1].ack()
        assert channel.queue_declare("rj", passive=True).message_count == 0


def test_declare_purge_delete_get_and_their_errors(url: str, task_broker: BrokerThread) -> None:
    with Connection(url) as conn, Connection(url) as other:
        channel = conn.channel()
        queue = Queue("q1", routing_key="q1")
        producer = Producer(channel)
        for n in range(5):
            producer.publish({"n": n}, routing_key="q1", declare=[queue])
        assert channel.queue_declare("q1", passive=True).message_count == 5
        message = channel.basic_get("q1")
        assert message.payload == {"n": 0}
        assert channel.queue_purge("q1") == 4  # the true count; the one held stays held
        message.requeue()
        assert channel.queue_declare("q1", passive=True).message_count == 1
        assert channel.basic_get("q1", no_ack=True).payload == {"n": 0}
        assert channel.basic_get("q1") is None
        # A passive declare of an empty queue succeeds (Redis's fails: it deletes empty lists).
        assert channel.queue_declare("q1", passive=True).message_count == 0
        with pytest.raises(transport.NotFound) as missing:
            channel.queue_declare("nope", passive=True)
        assert missing.value.code == 404 and isinstance(missing.value, conn.channel_errors)
        # Exclusive queues belong to their connection.
        channel.queue_declare("mine", exclusive=True)
        with pytest.raises(transport.ResourceLocked):
            other.channel().queue_declare("mine")
        with pytest.raises(transport.PreconditionFailed):
            channel.exchange_declare("jobs", "direct")
            channel.exchange_declare("jobs", "fanout")
        assert channel.queue_delete("q1") == 0
    # The exclusive queue went with its connection.
    wait_for(lambda: task_broker.call(lambda: _queue_names(task_broker)) == [], 5, "no queues left")


def _queue_names(broker: BrokerThread) -> list[str]:
    assert broker.server is not None and broker.server.broker is not None
    return sorted(q["name"] for q in broker.server.broker.tasks.queue_stats("/"))


def test_expiry_of_messages_and_queues(url: str, task_broker: BrokerThread) -> None:
    with Connection(url) as conn:
        channel = conn.channel()
        producer = Producer(channel)
        short = Queue("short", routing_key="short", message_ttl=0.05)  # x-message-ttl: every message
        producer.publish({"n": 1}, routing_key="short", declare=[short])
        mixed = Queue("mixed", routing_key="mixed")
        producer.publish({"n": 2}, routing_key="mixed", expiration=0.05, declare=[mixed])  # per message
        producer.publish({"n": 3}, routing_key="mixed", expiration=60)
        wait_for(lambda: channel.queue_declare("short", passive=True).message_count == 0, 5, "x-message-ttl")
        wait_for(lambda: channel.queue_declare("mixed", passive=True).message_count == 1, 5, "the expiration")
        assert channel.basic_get("mixed", no_ack=True).payload == {"n": 3}
        channel.queue_declare("gone-soon", arguments={"x-expires": 100})
        wait_for(lambda: "gone-soon" not in _queue_names(task_broker), 5, "x-expires deleted the queue")


def test_auto_delete_queue_goes_with_its_last_consumer(url: str, task_broker: BrokerThread) -> None:
    with Connection(url) as conn:
        queue = Queue("reply.x", routing_key="reply.x", auto_delete=True)
        consumer = Consumer(conn, [queue], callbacks=[collect([])])
        consumer.consume()
        assert "reply.x" in _queue_names(task_broker)
        consumer.cancel()
        assert "reply.x" not in _queue_names(task_broker)


def test_a_mebibyte_goes_through_and_too_large_fails_at_publish(broker_factory: Any) -> None:
    big = broker_factory(max_body=2 << 20)
    url = dmb_url(big.address)
    with Connection(url) as conn:
        queue = Queue("big", routing_key="big")
        producer = Producer(conn.channel())
        producer.publish({"data": "x" * (1 << 20)}, routing_key="big", declare=[queue])
        got: list = []
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            drain(conn, got, 1)
        assert len(got[0][0]["data"]) == 1 << 20
        with pytest.raises(MessageTooLarge):
            producer.publish({"data": "x" * (3 << 20)}, routing_key="big")


def test_confirmed_publishes_raise_the_brokers_error(url: str) -> None:
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        channel.queue_declare("tiny", arguments={"x-max-length": 1})
        producer = Producer(channel)
        producer.publish({"n": 1}, routing_key="tiny")
        with pytest.raises(QueueFull):
            producer.publish({"n": 2}, routing_key="tiny")


CONSUMER = textwrap.dedent(
    """
    import sys, time
    from kombu import Connection, Consumer, Queue
    import django_message_broker.celery
    with Connection(sys.argv[1]) as conn:
        def on_message(body, message):
            print("got", body["n"], flush=True)   # held, never acked
        with Consumer(conn, [Queue("held", routing_key="held")], callbacks=[on_message]):
            conn.drain_events(timeout=10)
            time.sleep(float(sys.argv[2]))       # busy: Python does not run, libzmq still answers
            print("still here", flush=True)
            time.sleep(60)
    """
)


def _held_by_a_process(url: str, hold: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, url, str(hold)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "got 1"
    return process


def test_a_killed_consumers_messages_come_back_at_once(url: str) -> None:
    with Connection(url) as conn:
        Producer(conn.channel()).publish({"n": 1}, routing_key="held", declare=[Queue("held", routing_key="held")])
        process = _held_by_a_process(url, 60)
        got: list = []
        with Consumer(conn, [Queue("held", routing_key="held")], callbacks=[collect(got)]):
            killed = time.monotonic()
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            drain(conn, got, 1, timeout=5)
            took = time.monotonic() - killed
        assert got[0][1].delivery_info["redelivered"] is True
        assert took < 1.0, f"redelivered {took:.3f}s after the kill"


@pytest.mark.slow
def test_a_live_consumer_keeps_what_it_holds_however_long(url: str) -> None:
    """No age-based redelivery: a busy process (its Python blocked past
    ZeroMQ's heartbeat timeout) keeps its message."""
    with Connection(url) as conn:
        Producer(conn.channel()).publish({"n": 1}, routing_key="held", declare=[Queue("held", routing_key="held")])
        process = _held_by_a_process(url, 4.5)
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "still here"
            got: list = []
            with Consumer(conn, [Queue("held", routing_key="held")], callbacks=[collect(got)]):
                with pytest.raises(TimeoutError):
                    conn.drain_events(timeout=0.5)
            assert got == []
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_a_lost_broker_is_a_connection_error_within_two_seconds(tmp_path: Path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    first = BrokerThread(address).start()
    conn = Connection(dmb_url(address))
    try:
        conn.connect()
        queue = Queue("q", routing_key="q")
        with Consumer(conn, [queue], callbacks=[collect([])]):
            first.stop()
            lost = time.monotonic()
            with pytest.raises(conn.connection_errors):
                while time.monotonic() - lost < 5:
                    try:
                        conn.drain_events(timeout=0.1)
                    except TimeoutError:
                        pass
            assert time.monotonic() - lost < 2.0
    finally:
        conn.close()
    second = BrokerThread(address).start()
    try:
        with Connection(dmb_url(address)) as again:  # a new connection works: Celery reconnects like this
            got: list = []
            Producer(again.channel()).publish({"n": 1}, routing_key="q", declare=[Queue("q", routing_key="q")])
            with Consumer(again, [Queue("q", routing_key="q")], callbacks=[collect(got)]):
                drain(again, got, 1)
    finally:
        second.stop()


PRODUCER = textwrap.dedent(
    """
    import sys, time
    from kombu import Connection, Producer
    import django_message_broker.celery
    with Connection(sys.argv[1]) as conn:
        Producer(conn.channel()).publish({"n": 1}, routing_key="nobody")
        print("published", flush=True)
        time.sleep(60)
    """
)


def test_the_broker_forgets_a_killed_producer(url: str, task_broker: BrokerThread) -> None:
    """A connection with no consumers and no heartbeats of its own (a web
    process that only publishes) is forgotten when its process dies."""
    assert task_broker.server is not None and task_broker.server.broker is not None
    broker = task_broker.server.broker
    process = subprocess.Popen([sys.executable, "-c", PRODUCER, url], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "published"
    assert task_broker.call(lambda: len(broker.clients)) == 1
    process.kill()
    process.wait(10)
    wait_for(lambda: task_broker.call(lambda: len(broker.clients)) == 0, 5, "the broker to forget the producer")


def test_a_delivery_that_comes_while_a_consumer_sends_is_not_slept_over(url: str) -> None:
    """In Celery's hub: a consumer that sends (publishes, acks) while the
    transport hands out deliveries lets ZeroMQ take in a delivery that came
    meanwhile and reset the socket's descriptor, so the descriptor will not
    wake the hub for it. The transport looks again before the hub sleeps."""
    import zmq
    from kombu.asynchronous import Hub

    hub = Hub()
    got: list[str] = []
    queue = Queue("edge", routing_key="edge")
    with Connection(url) as conn:
        conn.connect()
        channel = conn.channel()
        tc = conn.transport.task_connection

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            if body == "first":  # a chain: publish the next, ack, and the next is here at once
                Producer(channel).publish("second", routing_key="edge")
                message.ack()
                # zmq_poll, as a library in the task might: it takes in what
                # arrived, and with it the descriptor's edge.
                assert tc.sock.poll(5000, zmq.POLLIN)
            else:
                message.ack()

        with Consumer(channel, [queue], callbacks=[on_message]):
            conn.transport.register_with_event_loop(conn.connection, hub)
            hub.run_once()  # the consumer's setup
            Producer(channel).publish("first", routing_key="edge", declare=[queue])
            assert tc.sock.poll(5000, zmq.POLLIN)  # "first" is here, and its edge taken
            hub.run_once()  # one turn: "first", and "second" before the hub sleeps
            assert got == ["first", "second"], got
        conn.transport.unregister_from_event_loop(conn.connection, hub)
    hub.close()
