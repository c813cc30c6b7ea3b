"""CURVE from Django: the layer's server_key/client_key, ProcessClient,
``manage.py brokerkeys``, ``manage.py runbroker``'s bind rule and
``MESSAGE_BROKER_SERVER``, and the system checks about them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test.utils import override_settings

from django_message_broker import AuthenticationFailed, ProcessClient
from django_message_broker.layer import ChannelsServerLayer
from django_message_broker.management.commands import runbroker
from helpers import Keys

BACKEND = "django_message_broker.ChannelsServerLayer"


# -- the layer and ProcessClient ---------------------------------------------------
async def test_the_layer_round_trips_over_curve(curve_broker: Any, keys: Keys) -> None:
    layer = ChannelsServerLayer(
        address=curve_broker.address, server_key=str(keys.broker_public), client_key=str(keys.good_secret)
    )
    try:
        assert layer.options.embedded is False  # no embedded broker for a CURVE configuration
        await layer.send("secure", {"type": "hello"})
        assert await asyncio.wait_for(layer.receive("secure"), 5) == {"type": "hello"}
    finally:
        await layer.close()


async def test_the_layer_with_an_unknown_key_raises_authentication_failed(curve_broker: Any, keys: Keys) -> None:
    layer = ChannelsServerLayer(
        address=curve_broker.address, server_key=str(keys.broker_public), client_key=str(keys.bad_secret)
    )
    try:
        with pytest.raises(AuthenticationFailed):
            await asyncio.wait_for(layer.send("secure", {"type": "hello"}), 2)
    finally:
        await layer.close()


def test_process_client_round_trips_over_curve(curve_broker: Any, keys: Keys) -> None:
    config = {
        "address": curve_broker.address,
        "server_key": str(keys.broker_public),
        "client_key": str(keys.good_secret),
    }
    with ProcessClient(config) as client:
        client.send("secure", {"n": 1})
        assert client.receive("secure", timeout=5) == {"n": 1}


# -- manage.py brokerkeys --------------------------------------------------------
def test_brokerkeys_writes_a_pair(tmp_path: Path) -> None:
    call_command("brokerkeys", "web-1", "--dir", str(tmp_path))
    public, secret = zmq.auth.load_certificate(str(tmp_path / "web-1.key_secret"))
    assert public and secret
    assert (tmp_path / "web-1.key_secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(CommandError, match="--force"):
        call_command("brokerkeys", "web-1", "--dir", str(tmp_path))
    call_command("brokerkeys", "web-1", "--dir", str(tmp_path), "--force")
    assert zmq.auth.load_certificate(str(tmp_path / "web-1.key_secret"))[1] != secret


# -- manage.py runbroker ---------------------------------------------------------
@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    async def fake_serve(address: str, **options: Any) -> None:
        calls.append((address, options))

    monkeypatch.setattr(runbroker, "serve", fake_serve)
    return calls


def test_runbroker_refuses_a_non_loopback_bind_without_a_key(no_serving: list) -> None:
    with pytest.raises(CommandError, match="--insecure"):
        call_command("runbroker", "--bind", "tcp://0.0.0.0:5556")
    assert no_serving == []


def test_runbroker_takes_insecure(no_serving: list) -> None:
    call_command("runbroker", "--bind", "tcp://0.0.0.0:5556", "--insecure")
    assert no_serving[0][0] == "tcp://0.0.0.0:5556" and no_serving[0][1]["insecure"] is True


def test_runbroker_reads_message_broker_server(no_serving: list, keys: Keys) -> None:
    conf = {
        "bind": "tcp://10.1.2.3:5556",
        "secret_key": str(keys.broker_secret),
        "authorized_keys": str(keys.authorized),
        "ipc_mode": 0o660,
    }
    with override_settings(MESSAGE_BROKER_SERVER=conf):
        call_command("runbroker")
    address, options = no_serving[0]
    assert address == "tcp://10.1.2.3:5556"
    assert options["secret_key"] == str(keys.broker_secret)
    assert options["authorized_keys"] == str(keys.authorized)
    assert options["ipc_mode"] == 0o660 and options["insecure"] is False


def test_runbroker_rejects_unknown_server_settings(no_serving: list) -> None:
    with override_settings(MESSAGE_BROKER_SERVER={"secretkey": "x"}):
        with pytest.raises(CommandError, match="secretkey"):
            call_command("runbroker")


# -- system checks ---------------------------------------------------------------
def run(config: dict[str, Any], **settings: Any) -> dict[str, checks.CheckMessage]:
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": BACKEND, "CONFIG": config}}, **settings):
        messages = checks.run_checks(tags=["django_message_broker"])
    return {m.id: m for m in messages if (m.id or "").startswith("django_message_broker.")}


def test_a_remote_broker_with_keys_passes(keys: Keys) -> None:
    config = {"address": "tcp://10.1.2.3:5556", "server_key": str(keys.broker_public)}
    assert set(run({**config, "client_key": str(keys.good_secret)})) == set()
    assert set(run(config)) == {"django_message_broker.W002"}


def test_a_remote_broker_without_keys_warns() -> None:
    found = run({"address": "tcp://10.1.2.3:5556"})
    assert set(found) == {"django_message_broker.W001"}
    assert "server_key" in (found["django_message_broker.W001"].hint or "")


def test_unreadable_keys_are_an_error(keys: Keys, tmp_path: Path) -> None:
    found = run({"address": "tcp://10.1.2.3:5556", "server_key": str(tmp_path / "missing.key")})
    assert found["django_message_broker.E006"].level == checks.ERROR
    found = run({"client_key": str(keys.good_secret)})
    assert "django_message_broker.E006" in found


def test_message_broker_server_is_checked(keys: Keys) -> None:
    assert run({}, MESSAGE_BROKER_SERVER={"bind": "tcp://10.1.2.3:5556"}).keys() == {"django_message_broker.E005"}
    found = run({}, MESSAGE_BROKER_SERVER={"bind": "tcp://10.1.2.3:5556", "insecure": True})
    assert found.keys() == {"django_message_broker.W003"}
    secure = {"bind": "tcp://10.1.2.3:5556", "secret_key": str(keys.broker_secret)}
    assert run({}, MESSAGE_BROKER_SERVER=secure) == {}
    found = run({}, MESSAGE_BROKER_SERVER={"secret_key": str(keys.broker_public)})
    assert "no secret key" in found["django_message_broker.E005"].msg


def test_message_broker_server_without_bind_is_checked_against_the_layer_address(keys: Keys) -> None:
    config = {
        "address": "tcp://10.1.2.3:5556",
        "server_key": str(keys.broker_public),
        "client_key": str(keys.good_secret),
    }
    found = run(config, MESSAGE_BROKER_SERVER={"ipc_mode": 0o660})
    assert found.keys() == {"django_message_broker.E005"}
    assert run(config, MESSAGE_BROKER_SERVER={"secret_key": str(keys.broker_secret)}) == {}
