"""Django in real processes: setup starts nothing, ``runbroker`` serves and
stops, a worker process posts to a group, and the embedded default starts
exactly one broker for many processes, which outlives its starter and exits
when idle. Every process a test starts is killed at teardown (``spawn``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from channels.layers import get_channel_layer
from dmb_helpers import broker_processes, describe, django_env, free_port, listening, wait_for

from django_message_broker._runtime import files_for
from django_message_broker.embedded import probe
from django_message_broker.layer import ChannelsServerLayer


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of ``process`` (blocking reads, bounded by a thread)."""
    import threading

    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"no output from pid {process.pid} within {timeout}s")
    return result[0].decode(errors="replace").rstrip("\n")


async def exchange_through(address: str) -> None:
    layer = ChannelsServerLayer(address=address, embedded=False)
    try:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "ping"})
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "ping"}
        await layer.send("plain-through", {"type": "pong"})
        assert await asyncio.wait_for(layer.receive("plain-through"), 5) == {"type": "pong"}
    finally:
        await layer.close()


# -- setup starts nothing ------------------------------------------------------------
SETUP_PROBE = r"""
import json, os, socket, sys, threading, time
import psutil
port = int(sys.argv[1])
report = {"start": threading.active_count()}
import django_message_broker
report["import"] = threading.active_count()
from django_message_broker import ChannelsServerLayer, ProcessClient  # the lazy names too
report["lazy"] = threading.active_count()
import django
django.setup()
report["setup"] = threading.active_count()
from django.core import checks
checks.run_checks()
from channels.layers import channel_layers
report["layer_config"] = channel_layers.configs["default"]["CONFIG"]
time.sleep(0.3)  # anything started in the background would be up by now
report["later"] = threading.active_count()
report["threads"] = [t.name for t in threading.enumerate()]
report["children"] = [c.pid for c in psutil.Process().children(recursive=True)]
with socket.socket() as s:
    s.settimeout(0.5)
    report["listening"] = s.connect_ex(("127.0.0.1", port)) == 0
print(json.dumps(report), flush=True)
"""


def test_import_and_setup_start_no_broker_and_no_thread(spawn):
    port = free_port()
    spawn.watch_port(port)
    # the embedded default (no "embedded" key, local address): first *use* of
    # the layer would start a broker, but import and setup must not
    env = django_env(DMB_TEST_ADDRESS=f"tcp://127.0.0.1:{port}", DMB_TEST_EMBEDDED="default")
    process = spawn.python("-c", SETUP_PROBE, str(port), env=env)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert "embedded" not in report["layer_config"]
    assert report["start"] == report["import"] == report["lazy"] == report["setup"] == report["later"], report
    assert report["threads"] == ["MainThread"], report
    assert report["children"] == [], report
    assert report["listening"] is False
    assert broker_processes(port) == []
    assert not listening(port)


# -- runbroker ---------------------------------------------------------------------
def listening_ports(pid: int) -> list[int]:
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return sorted(c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN)


def stop_and_check(process: subprocess.Popen, address: str) -> str:
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=15)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    assert not probe(address, 0.3)
    return text


def test_runbroker_via_call_command_serves_and_exits_on_sigterm(spawn):
    port = free_port()
    spawn.watch_port(port)
    address = f"tcp://127.0.0.1:{port}"
    script = (
        "import sys, django; django.setup()\n"
        "from django.core.management import call_command\n"
        "call_command('runbroker', bind=sys.argv[1])\n"
    )
    # the settings name another address: --bind wins
    env = django_env(DMB_TEST_ADDRESS=f"tcp://127.0.0.1:{free_port()}")
    process = spawn.python("-c", script, address, env=env)
    assert wait_for(lambda: process.poll() is not None or probe(address, 0.2), 20), "runbroker did not answer"
    assert process.poll() is None
    asyncio.run(exchange_through(address))
    assert listening_ports(process.pid) == [port]
    text = stop_and_check(process, address)
    assert f"listening on {address}" in text


def test_manage_runbroker_reads_address_from_settings(spawn):
    port = free_port()
    spawn.watch_port(port)
    address = f"tcp://127.0.0.1:{port}"
    # the predecessor's ip_address/port spelling, and no --bind
    env = django_env(DMB_TEST_PORT=port)
    process = spawn.python("-m", "django", "runbroker", env=env)
    assert wait_for(lambda: process.poll() is not None or probe(address, 0.2), 20), "runbroker did not answer"
    assert process.poll() is None
    assert listening_ports(process.pid) == [port]
    asyncio.run(exchange_through(address))
    text = stop_and_check(process, address)
    assert f"listening on {address}" in text


def test_runbroker_on_a_busy_address_fails_cleanly(spawn, broker):
    process = spawn.python("-m", "django", "runbroker", "--bind", broker.address, env=django_env())
    out, _ = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "cannot serve on" in out.decode(errors="replace")
    assert probe(broker.address)  # the running broker is unharmed


# -- a worker process ------------------------------------------------------------------
WORKER = r"""
import sys, django
django.setup()
from django_message_broker import ProcessClient
with ProcessClient() as client:  # CONFIG from settings.CHANNEL_LAYERS["default"]
    job = client.receive("jobs", timeout=20)
    delivered, skipped = client.group_send(job["room"], {"type": "chat.message", "text": "done " + job["id"]})
    print(delivered, skipped, flush=True)
"""


async def test_worker_process_posts_to_a_group(spawn, use_layers, broker):
    await use_layers()
    layer = get_channel_layer()
    member = await layer.new_channel()
    await layer.group_add("worker-room", member)
    process = spawn.python("-c", WORKER, env=django_env(DMB_TEST_ADDRESS=broker.address))
    await layer.send("jobs", {"type": "job", "room": "worker-room", "id": "42"})
    message = await asyncio.wait_for(layer.receive(member), 30)
    assert message == {"type": "chat.message", "text": "done 42"}
    out, _ = await asyncio.to_thread(process.communicate, timeout=15)
    assert process.returncode == 0, out.decode()
    assert out.decode().split() == ["1", "0"]


# -- the embedded default ---------------------------------------------------------------
EMBEDDED_CLIENT = r"""
import asyncio, logging, os, sys
import django
django.setup()

class Report(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("started an embedded broker"):
            print("started-broker", flush=True)

log = logging.getLogger("django_message_broker.embedded")
log.addHandler(Report())
log.setLevel(logging.INFO)

from channels.layers import get_channel_layer
index, count = int(sys.argv[1]), int(sys.argv[2])

async def main():
    layer = get_channel_layer()
    assert layer.options.embedded is True, layer.options
    await layer.send(f"ring-{(index + 1) % count}", {"type": "ring", "from": index})
    message = await asyncio.wait_for(layer.receive(f"ring-{index}"), 40)
    print(f"got {message['from']}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await layer.close()
    print("closed", flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_embedded_default_starts_exactly_one_broker_for_many_processes(spawn):
    count = 10
    port = free_port()
    spawn.watch_port(port)
    address = f"tcp://127.0.0.1:{port}"
    files = files_for(address)  # where embedded.py keeps the lock, log and pid of the broker it starts
    log_path = files.log
    log_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    env = django_env(
        DMB_TEST_ADDRESS=address, DMB_TEST_EMBEDDED="default", DMB_TEST_IDLE_TIMEOUT=2, DMB_TEST_TIMEOUT=30
    )
    assert not listening(port)
    clients = [
        # each in its own process group, like processes a supervisor runs
        spawn.python("-c", EMBEDDED_CLIENT, str(i), str(count), env=env, stdin=subprocess.PIPE, start_new_session=True)
        for i in range(count)
    ]

    started: list[subprocess.Popen] = []  # one entry per "started a broker" a client logs

    def next_line(client: subprocess.Popen) -> str:
        while True:
            line = read_line(client, 45)
            if line != "started-broker":
                return line
            started.append(client)

    # all ten exchange a message around the ring
    for i, client in enumerate(clients):
        assert next_line(client) == f"got {(i - 1) % count}", i
    starters = list(started)

    # exactly one broker was started, by one of them
    assert len(starters) == 1, f"{len(starters)} processes report starting a broker"
    brokers = broker_processes(port)
    assert len(brokers) == 1, [*describe(brokers), f"starter pid {starters[0].pid}"]
    broker = brokers[0]
    assert broker.ppid() == starters[0].pid
    with open(log_path, "rb") as handle:
        handle.seek(log_offset)
        log = handle.read().decode(errors="replace")
    assert log.count(f"django-message-broker listening on {address}") == 1, log
    assert "cannot serve" not in log and "Traceback" not in log, log

    # killing the process that started it does not kill the broker
    # (its whole process group, as a supervisor stopping it would)
    starter = starters[0]
    os.killpg(starter.pid, signal.SIGKILL)
    starter.wait(10)
    time.sleep(0.3)  # a broker tied to its parent would be gone by now
    assert broker.is_running() and broker.status() != psutil.STATUS_ZOMBIE
    assert probe(address, 1.0)
    assert broker_processes(port) == [broker]

    # the others close their layers and exit: once idle, the broker exits by itself
    closed_at = time.monotonic()
    for client in clients:
        if client is not starter:
            client.stdin.write(b"quit\n")
            client.stdin.flush()
    for client in clients:
        if client is not starter:
            assert next_line(client) == "closed"
            assert client.wait(15) == 0
    # idle timeout 2 s, after the killed client's connection times out
    gone = wait_for(lambda: not broker.is_running() or broker.status() == psutil.STATUS_ZOMBIE, 30, 0.1)
    waited = time.monotonic() - closed_at
    assert gone, f"the broker still runs {waited:.1f}s after its last client closed"
    assert waited >= 2.0, f"the broker exited after {waited:.1f}s, before its 2 s idle timeout"
    assert not probe(address, 0.3)
    # and over the whole run, one broker was started: no client started another
    assert len(started) == 1, f"{len(started)} broker starts were logged"
    # it removed its files as it exited
    leftover = [path for path in files if os.path.exists(path)]
    assert not leftover, leftover
