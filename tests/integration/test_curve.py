"""CURVE: encryption on the wire, the allow-list, and how a refused client
learns it (``AuthenticationFailed`` within 2 s, never a timeout).

Real brokers on free loopback ports. A small TCP relay between a client and
the broker records every byte, so that "encrypted" is checked on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq
import zmq.auth

from django_message_broker import AsyncClient, AuthenticationFailed, BrokerServer, SyncClient
from django_message_broker import __main__ as cli
from django_message_broker.client import core as client_core
from django_message_broker.embedded import ensure_broker, probe
from django_message_broker.keys import create_keypair, load_public_key
from helpers import Keys

REFUSAL_DEADLINE = 2.0  # seconds: the brief's bound for AuthenticationFailed
MARKER = b"marker-7f3a9c1e-do-not-leak"


class Relay:
    """A man in the middle on loopback: accepts connections, forwards them
    to ``target`` and records every byte in both directions."""

    def __init__(self, target: str) -> None:
        host, port = target[len("tcp://") :].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-relay", daemon=True)
        self._thread.start()

    def capture(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([self.listener, *pairs], [], [], 0.05)
                for sock in readable:
                    if sock is self.listener:
                        client, _ = self.listener.accept()
                        upstream = socket.create_connection(self.target, timeout=5)
                        pairs[client], pairs[upstream] = upstream, client
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    peer = pairs.get(sock)
                    if not data or peer is None:
                        for s in (sock, peer):
                            if s is not None:
                                pairs.pop(s, None)
                                s.close()
                        continue
                    with self._lock:
                        self.captured += data
                    peer.sendall(data)
        finally:
            for sock in pairs:
                sock.close()
            self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def relay_factory() -> Iterator[Any]:
    relays: list[Relay] = []

    def make(target: str) -> Relay:
        relays.append(Relay(target))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def timed_refusal(fn: Any) -> float:
    """Seconds until ``fn()`` raises AuthenticationFailed (fails otherwise)."""
    start = time.monotonic()
    with pytest.raises(AuthenticationFailed):
        fn()
    elapsed = time.monotonic() - start
    assert elapsed < REFUSAL_DEADLINE, f"AuthenticationFailed after {elapsed:.3f}s"
    return elapsed


# --------------------------------------------------------------- on the wire
@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plain"])
def test_a_man_in_the_middle_sees_the_body_only_without_curve(
    broker_factory: Any, keys: Keys, relay_factory: Any, curve: bool
) -> None:
    if curve:
        broker = broker_factory(secret_key=str(keys.broker_secret), authorized_keys=str(keys.authorized))
        options = {"server_key": str(keys.broker_public), "client_key": str(keys.good_secret)}
    else:
        broker = broker_factory()
        options = {}
    relay = relay_factory(broker.address)
    with SyncClient(relay.address, timeout=5, **options) as client:
        client.send("secret.channel", b"body with " + MARKER)
        assert client.receive("secret.channel", timeout=5) == b"body with " + MARKER
    capture = relay.capture()
    assert len(capture) > len(MARKER)  # the relay did carry the conversation
    if curve:
        assert MARKER not in capture
        assert b"secret.channel" not in capture
    else:
        assert MARKER in capture  # the same test fails when encryption is off


# ------------------------------------------------------------- who gets in
def test_an_authorized_client_round_trips(curve_broker: Any, keys: Keys) -> None:
    with SyncClient(curve_broker.address, server_key=str(keys.broker_public), client_key=str(keys.good_secret)) as c:
        c.send("ch", b"hello")
        assert c.receive("ch", timeout=5) == b"hello"


async def test_an_authorized_async_client_round_trips_with_a_z85_server_key(curve_broker: Any, keys: Keys) -> None:
    server_key = load_public_key(keys.broker_public).decode()
    assert len(server_key) == 40
    async with AsyncClient(curve_broker.address, server_key=server_key, client_key=str(keys.good_secret)) as c:
        await c.send("ch", b"hello")
        assert await asyncio.wait_for(c.receive("ch"), 5) == b"hello"


def _refused_everywhere(address: str, **options: Any) -> float:
    """A refused client: its first call, a waiting receive and later calls
    all fail with AuthenticationFailed, fast. Returns the first call's time."""
    with SyncClient(address, timeout=10, **options) as client:
        first = timed_refusal(lambda: client.send("ch", b"x"))
        timed_refusal(lambda: client.receive("ch", timeout=10))
        timed_refusal(client.stats)
        assert not client.wait_connected(0.1)
    return first


def test_an_unknown_key_is_refused(curve_broker: Any, keys: Keys) -> None:
    elapsed = _refused_everywhere(
        curve_broker.address, server_key=str(keys.broker_public), client_key=str(keys.bad_secret)
    )
    print(f"unknown key: AuthenticationFailed after {elapsed * 1000:.1f} ms")


def test_a_throwaway_key_is_refused_by_a_broker_with_an_allow_list(curve_broker: Any, keys: Keys) -> None:
    elapsed = _refused_everywhere(curve_broker.address, server_key=str(keys.broker_public))
    print(f"throwaway key: AuthenticationFailed after {elapsed * 1000:.1f} ms")


def test_a_plain_text_client_is_refused(curve_broker: Any) -> None:
    elapsed = _refused_everywhere(curve_broker.address)
    print(f"plain text client: AuthenticationFailed after {elapsed * 1000:.1f} ms")


def test_a_wrong_server_key_is_refused(curve_broker: Any, keys: Keys) -> None:
    elapsed = _refused_everywhere(
        curve_broker.address, server_key=str(keys.good_public), client_key=str(keys.good_secret)
    )
    print(f"wrong server key: AuthenticationFailed after {elapsed * 1000:.1f} ms")


def test_a_curve_client_of_a_plain_broker_is_refused(broker: Any, keys: Keys) -> None:
    elapsed = _refused_everywhere(broker.address, server_key=str(keys.broker_public), client_key=str(keys.good_secret))
    print(f"CURVE client, plain broker: AuthenticationFailed after {elapsed * 1000:.1f} ms")


async def test_a_waiting_async_receive_fails_when_the_handshake_is_refused(curve_broker: Any, keys: Keys) -> None:
    async with AsyncClient(curve_broker.address, timeout=10, server_key=str(keys.broker_public)) as client:
        start = time.monotonic()
        with pytest.raises(AuthenticationFailed):
            await asyncio.wait_for(client.receive("ch"), 5)
        assert time.monotonic() - start < REFUSAL_DEADLINE


def test_a_revoked_key_is_refused_for_new_connections(curve_broker: Any, keys: Keys) -> None:
    options = {"server_key": str(keys.broker_public), "client_key": str(keys.good_secret)}
    with SyncClient(curve_broker.address, **options) as before:
        before.send("ch", b"1")
        assert before.receive("ch", timeout=5) == b"1"
        (keys.authorized / keys.good_public.name).unlink()
        assert curve_broker.call(curve_broker.server.reload_keys) == 0
        elapsed = _refused_everywhere(curve_broker.address, **options)
        print(f"revoked key: AuthenticationFailed after {elapsed * 1000:.1f} ms")
        # A connection made before the revocation stays (docs/security.md).
        before.send("ch", b"2")
        assert before.receive("ch", timeout=5) == b"2"


def test_a_refused_client_gets_in_once_its_key_is_authorized(
    curve_broker: Any, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_core, "_AUTH_RETRY", 0.2)
    _, late_secret = create_keypair("late", tmp_path)
    with SyncClient(curve_broker.address, server_key=str(keys.broker_public), client_key=str(late_secret)) as c:
        timed_refusal(c.stats)
        shutil.copy(tmp_path / "late.key", keys.authorized)
        curve_broker.call(curve_broker.server.reload_keys)
        assert c.wait_connected(5)
        c.send("ch", b"in")
        assert c.receive("ch", timeout=5) == b"in"


def test_the_embedded_probe_speaks_curve(curve_broker: Any, keys: Keys) -> None:
    assert probe(curve_broker.address, 1.0, server_key=str(keys.broker_public), client_key=str(keys.good_secret))
    assert not probe(curve_broker.address, 0.3)
    assert not probe(curve_broker.address, 0.3, server_key=str(keys.broker_public), client_key=str(keys.bad_secret))


def test_no_embedded_broker_is_started_for_a_curve_configuration(keys: Keys) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(RuntimeError, match="not started"):
        ensure_broker(address, server_key=str(keys.broker_public), client_key=str(keys.good_secret))
    assert not probe(address, 0.2)


def test_bad_key_options_fail_in_the_constructor(keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SyncClient("tcp://127.0.0.1:1", server_key=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="no secret key"):
        SyncClient("tcp://127.0.0.1:1", server_key=str(keys.broker_public), client_key=str(keys.good_public))
    with pytest.raises(ValueError, match="needs server_key"):
        SyncClient("tcp://127.0.0.1:1", client_key=str(keys.good_secret))
    with pytest.raises(ValueError, match="Z85"):
        SyncClient("tcp://127.0.0.1:1", server_key="," * 40)


# ---------------------------------------------------- SIGHUP on `serve`
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_rereads_the_authorized_keys_on_sighup(keys: Keys) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "django_message_broker", "serve", "--bind", address]
    command += ["--secret-key", str(keys.broker_secret), "--authorized-keys", str(keys.authorized)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    options = {"server_key": str(keys.broker_public), "client_key": str(keys.good_secret)}
    try:
        deadline = time.monotonic() + 10
        while not probe(address, 0.2, **options):
            assert process.poll() is None and time.monotonic() < deadline, "the broker did not start"
        (keys.authorized / keys.good_public.name).unlink()
        process.send_signal(signal.SIGHUP)
        while probe(address, 0.2, **options):  # the reload is asynchronous
            assert time.monotonic() < deadline, "the key was not revoked"
        _refused_everywhere(address, **options)
        assert process.poll() is None  # SIGHUP did not stop it
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "0 authorized client key(s)" in output


# ---------------------------------------------------------- binding rules
class _NoSockets:
    """A context that fails the test if the server creates any socket."""

    def socket(self, *args: Any) -> Any:
        raise AssertionError("a socket was created: the refusal came too late")

    def term(self) -> None:
        pass


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://10.1.2.3:5556"])
async def test_a_non_loopback_bind_without_a_key_is_refused_before_binding(address: str) -> None:
    server = BrokerServer(address, context=_NoSockets())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--insecure"):
        await server.start()


async def test_authorized_keys_without_a_secret_key_is_refused(tmp_path: Path) -> None:
    server = BrokerServer("tcp://127.0.0.1:0", authorized_keys=str(tmp_path), context=_NoSockets())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="secret key"):
        await server.start()


def test_serve_refuses_a_non_loopback_bind_without_insecure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def must_not_serve(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("serve() was called")

    monkeypatch.setattr(cli, "serve", must_not_serve)
    assert cli.main(["serve", "--bind", "tcp://0.0.0.0:5556"]) == 2
    assert "--insecure" in capsys.readouterr().err


async def test_ipc_socket_mode(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    async with BrokerServer(f"ipc://{path}", ipc_mode=0o660) as server:
        assert server.address == f"ipc://{path}"
        assert path.stat().st_mode & 0o777 == 0o660


def test_cli_ipc_mode_is_octal() -> None:
    assert cli._mode("0660") == 0o660
    with pytest.raises(argparse.ArgumentTypeError):
        cli._mode("rw")


# ------------------------------------------------------------------ keygen
def test_keygen_writes_a_loadable_pair_with_safe_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert cli.main(["keygen", "web-1", "--dir", str(out)]) == 0
    public, secret = out / "web-1.key", out / "web-1.key_secret"
    assert public.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600
    public_key, no_secret = zmq.auth.load_certificate(str(public))
    same_public, secret_key = zmq.auth.load_certificate(str(secret))
    assert public_key == same_public and len(public_key) == 40
    assert no_secret is None and secret_key is not None and len(secret_key) == 40
    assert str(public) in capsys.readouterr().out


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen", "b", "--dir", str(tmp_path)]) == 0
    first = (tmp_path / "b.key_secret").read_bytes()
    assert cli.main(["keygen", "b", "--dir", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "b.key_secret").read_bytes() == first
    assert cli.main(["keygen", "b", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "b.key_secret").read_bytes() != first


def test_keygen_rejects_a_path_as_name(tmp_path: Path) -> None:
    assert cli.main(["keygen", "../x", "--dir", str(tmp_path)]) == 1
    assert not (tmp_path.parent / "x.key").exists()


def test_keygen_secret_is_never_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, secret = create_keypair("loose", tmp_path)
    finally:
        os.umask(old)
    assert secret.stat().st_mode & 0o077 == 0
