"""System checks for risky CHANNEL_LAYERS configurations."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.test.utils import override_settings

BACKEND = "django_message_broker.ChannelsServerLayer"


def run(config: dict[str, Any], backend: str = BACKEND) -> dict[str, checks.CheckMessage]:
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": config}}):
        messages = checks.run_checks(tags=["django_message_broker"])
    return {m.id: m for m in messages if (m.id or "").startswith("django_message_broker.")}


def test_our_check_is_registered_under_its_tag():
    assert "django_message_broker" in checks.registry.registry.tags_available()


@pytest.mark.parametrize(
    "config",
    [
        {"address": "tcp://127.0.0.1:5556"},
        {"address": "tcp://127.0.0.2:5556", "embedded": True},
        {"address": "tcp://localhost:5556"},
        {"address": "tcp://[::1]:5556"},
        {"address": "ipc:///tmp/dmb-check.sock", "embedded": True},
        {"ip_address": "127.0.0.1", "port": 5556},
        {},
    ],
    ids=["loopback", "loopback-embedded", "localhost", "ipv6-loopback", "ipc", "predecessor-loopback", "defaults"],
)
def test_local_addresses_pass(config):
    assert run(config) == {}


def test_non_loopback_address_warns():
    found = run({"address": "tcp://10.1.2.3:5556", "embedded": False})
    assert set(found) == {"django_message_broker.W001"}
    warning = found["django_message_broker.W001"]
    assert warning.level == checks.WARNING
    assert "tcp://10.1.2.3:5556" in warning.msg
    assert warning.hint


def test_non_loopback_address_in_predecessor_spelling_warns():
    found = run({"ip_address": "0.0.0.0", "port": 5556})
    assert set(found) == {"django_message_broker.W001"}
    assert "tcp://0.0.0.0:5556" in found["django_message_broker.W001"].msg


def test_embedded_with_non_local_address_is_an_error():
    found = run({"address": "tcp://192.168.1.20:5556", "embedded": True})
    assert set(found) == {"django_message_broker.W001", "django_message_broker.E002"}
    assert found["django_message_broker.E002"].level == checks.ERROR
    assert found["django_message_broker.E002"].is_serious()


@pytest.mark.parametrize("capacity", [0, -1, "100"])
def test_bad_capacity_is_an_error(capacity):
    found = run({"address": "tcp://127.0.0.1:5556", "capacity": capacity})
    assert set(found) == {"django_message_broker.E003"}


def test_other_backends_are_not_checked():
    assert run({"hosts": [("10.1.2.3", 6379)]}, backend="channels_redis.core.RedisChannelLayer") == {}
    found = run({"address": "tcp://10.9.9.9:1"}, backend="django_message_broker.layer.ChannelsServerLayer")
    assert set(found) == {"django_message_broker.W001"}


# -- strict configuration: the same checks the layer runs (issue #9 item 3) -------
@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("expiry", "60", ["'expiry'", "number"]),
        ("group_expiry", -1, ["'group_expiry'", "> 0"]),
        ("timeout", float("nan"), ["'timeout'", "finite"]),
        ("prefetch", True, ["'prefetch'", "int", "bool"]),
        ("embedded", "yes", ["'embedded'", "True or False"]),
        ("max_message_size", 0, ["'max_message_size'", ">= 1"]),
        ("channel_capacity", {"http.*": "5"}, ["'channel_capacity'", "int"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_value_is_an_e001_naming_the_key(key, value, words):
    found = run({key: value})
    assert set(found) == {"django_message_broker.E001"}, found
    error = found["django_message_broker.E001"]
    assert error.level == checks.ERROR
    for word in words:
        assert word in error.msg, error.msg


def test_a_typo_is_an_e004_with_the_closest_key():
    found = run({"adress": "tcp://127.0.0.1:5556"})
    assert set(found) == {"django_message_broker.E004"}
    assert "'adress'" in found["django_message_broker.E004"].msg
    assert "did you mean 'address'?" in found["django_message_broker.E004"].msg


def test_every_problem_is_its_own_error():
    messages = run_all({"capcity": 5, "expiry": "60", "timeout": -1, "capacity": 0})
    assert sorted(m.id for m in messages) == [
        "django_message_broker.E001",
        "django_message_broker.E001",
        "django_message_broker.E003",
        "django_message_broker.E004",
    ]


@pytest.mark.parametrize(
    "config",
    [
        {"address": "10.1.2.3:5556"},
        {"address": "tcp://10.1.2.3"},
        {"ip_address": "10.1.2.3", "port": "5556"},
        {"ip_address": 10, "port": 5556},
    ],
    ids=["no-scheme", "no-port", "port-as-str", "host-as-int"],
)
def test_an_invalid_address_is_an_error_and_never_a_loopback_warning(config):
    found = run({**config, "embedded": True})
    assert set(found) == {"django_message_broker.E001"}, found


def test_an_address_without_a_scheme_shows_the_right_form():
    found = run({"address": "127.0.0.1:5556"})
    assert set(found) == {"django_message_broker.E001"}
    assert "write tcp://127.0.0.1:5556" in found["django_message_broker.E001"].msg


def test_a_non_dict_config_is_an_e001():
    assert set(run(["address"])) == {"django_message_broker.E001"}  # type: ignore[arg-type]


def run_all(config: dict[str, Any]) -> list[checks.CheckMessage]:
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": BACKEND, "CONFIG": config}}):
        messages = checks.run_checks(tags=["django_message_broker"])
    return [m for m in messages if (m.id or "").startswith("django_message_broker.")]


def test_runbroker_takes_max_memory_from_the_flag_or_config(monkeypatch):
    from django.core.management import call_command

    from django_message_broker.management.commands import runbroker

    seen: list[Any] = []

    async def fake_serve(address: str, **options: Any) -> None:
        seen.append(options["max_memory"])

    monkeypatch.setattr(runbroker, "serve", fake_serve)
    config = {"address": "tcp://127.0.0.1:5556", "embedded_max_memory": "64MB"}
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": BACKEND, "CONFIG": config}}):
        call_command("runbroker")
        call_command("runbroker", "--max-memory", "1GiB")
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": BACKEND, "CONFIG": {}}}):
        call_command("runbroker")
    assert seen == [64_000_000, 1 << 30, None]
