"""Two hosts for real: two network namespaces joined by a veth pair, the
broker in one (bound to its 10.x address, CURVE), clients in the other.

Needs root and ``ip netns``; skipped with the reason elsewhere. Every
address used lives only inside the namespaces this test creates, which are
deleted (with their veth pair) in a ``finally``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from helpers import Keys

CLIENT = textwrap.dedent(
    """
    import sys, time
    from django_message_broker import AuthenticationFailed, SyncClient

    address, server_key, client_key = sys.argv[1:4]
    start = time.monotonic()
    try:
        with SyncClient(address, timeout=5, server_key=server_key, client_key=client_key) as client:
            client.send("two.hosts", b"across the veth")
            assert client.receive("two.hosts", timeout=5) == b"across the veth"
    except AuthenticationFailed:
        print("refused %.3f" % (time.monotonic() - start), flush=True)
    else:
        print("ok %.3f" % (time.monotonic() - start), flush=True)
    """
)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _netns_unavailable() -> str:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"dmb-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip netns does not work here: {exc}"
    if made.returncode != 0:
        return f"ip netns does not work here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


_SKIP = _netns_unavailable()


class Hosts(NamedTuple):
    broker_ns: str
    client_ns: str
    broker_ip: str


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if _SKIP:
        pytest.skip(_SKIP)
    tag = f"{os.getpid() % 100000}"
    broker_ns, client_ns = f"dmb-broker-{tag}", f"dmb-client-{tag}"
    veth_b, veth_c = f"dmbb{tag}", f"dmbc{tag}"
    subnet = f"10.213.{os.getpid() % 250}"
    try:
        _ip("netns", "add", broker_ns)
        _ip("netns", "add", client_ns)
        _ip("link", "add", veth_b, "type", "veth", "peer", "name", veth_c)
        _ip("link", "set", veth_b, "netns", broker_ns)
        _ip("link", "set", veth_c, "netns", client_ns)
        for ns, dev, host in ((broker_ns, veth_b, 1), (client_ns, veth_c, 2)):
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Hosts(broker_ns, client_ns, f"{subnet}.1")
    finally:
        for ns in (broker_ns, client_ns):  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", veth_b, check=False)


def _in(ns: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *command]


def _client(hosts: Hosts, address: str, keys: Keys, client_key: Path) -> str:
    done = subprocess.run(
        _in(hosts.client_ns, sys.executable, "-c", CLIENT, address, str(keys.broker_public), str(client_key)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_two_hosts_curve_round_trip(hosts: Hosts, keys: Keys) -> None:
    address = f"tcp://{hosts.broker_ip}:5556"
    # Off loopback, plain text is refused before anything is bound...
    refused = subprocess.run(
        _in(hosts.broker_ns, sys.executable, "-m", "django_message_broker", "serve", "--bind", address),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "--insecure" in refused.stderr
    # With --insecure it serves plain text, and says so.
    insecure = subprocess.Popen(
        _in(hosts.broker_ns, sys.executable, "-m", "django_message_broker", "serve", "--bind", address, "--insecure"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert insecure.stdout is not None
        seen = [insecure.stdout.readline() for _ in range(2)]
        assert any("PLAIN TEXT" in line and "WARNING" in line for line in seen), seen
    finally:
        insecure.terminate()
        insecure.communicate(timeout=10)
    # ...and served with CURVE and an allow-list.
    command = [sys.executable, "-m", "django_message_broker", "serve", "--bind", address]
    command += ["--secret-key", str(keys.broker_secret), "--authorized-keys", str(keys.authorized)]
    broker = subprocess.Popen(
        _in(hosts.broker_ns, *command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert broker.stdout is not None
        deadline = time.monotonic() + 15
        for line in broker.stdout:
            if "listening on" in line or time.monotonic() > deadline:
                break
        assert broker.poll() is None, "the broker exited"
        authorized = _client(hosts, address, keys, keys.good_secret)
        assert authorized.startswith("ok"), authorized
        stranger = _client(hosts, address, keys, keys.bad_secret)
        assert stranger.startswith("refused"), stranger
        assert float(stranger.split()[1]) < 2.0
        print(f"two hosts: authorized client {authorized!r}, unknown key {stranger!r}")
    finally:
        broker.terminate()
        try:
            broker.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.communicate()
