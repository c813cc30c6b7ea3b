"""Strict configuration: every key of the layer's CONFIG, ProcessClient,
AsyncClient and SyncClient is checked for name, type and value when the
object is built (issue #9 item 3)."""

from __future__ import annotations

import ast
import math
import pathlib
from typing import Any

import pytest

from django_message_broker import AsyncClient, SyncClient
from django_message_broker.layer import ChannelsServerLayer, layer_options
from django_message_broker.options import (
    DEFAULT_ADDRESS,
    DEFAULT_MAX_MESSAGE_SIZE,
    LAYER_KEYS,
    ClientOptions,
    LayerOptions,
    config_problems,
)
from django_message_broker.worker import ProcessClient

SRC = pathlib.Path(__file__).parents[2] / "src" / "django_message_broker"

#: key -> (a value of the wrong type, the type the message names)
WRONG_TYPES: dict[str, tuple[Any, str]] = {
    "address": (5556, "str"),
    "timeout": ("5", "number"),
    "heartbeat": (True, "number"),
    "prefetch": (16.0, "int"),
    "process_prefetch": ("128", "int"),
    "idle_return": ([1], "number"),
    "embedded": (1, "True or False"),
    "embedded_idle_timeout": ("60", "number"),
    "embedded_max_memory": (1.5, "size"),
    "max_message_size": (1.5, "int"),
    "expiry": ("60", "number"),
    "group_expiry": (None, "number"),
    "capacity": (True, "int"),
    "channel_capacity": ([("a*", 5)], "dict"),
    "ip_address": (127001, "str"),
    "port": ("5556", "int"),
    "server_key": (42, "certificate file"),
    "client_key": (["a"], "certificate file"),
    "prefix": (b"mysite", "str"),
}

#: key -> values of the right type that are out of range
BAD_VALUES: dict[str, list[Any]] = {
    "address": [
        "127.0.0.1:5556",
        "tcp://127.0.0.1",
        "tcp://:5556",
        "tcp://*:5556",
        "tcp://h:0",
        "ipc://",
        "http://x:1",
    ],
    "timeout": [0, -1, math.nan, math.inf],
    "heartbeat": [0.0, -0.5, math.nan],
    "prefetch": [0, -1, 1 << 17],
    "process_prefetch": [0],
    "idle_return": [-1, math.inf],
    "embedded_idle_timeout": [0, math.nan],
    "embedded_max_memory": [0, -1, "lots", "12 parsecs"],
    "max_message_size": [0, -1],
    "expiry": [0, -60, math.nan, math.inf, 10**9],
    "group_expiry": [0, math.inf],
    "capacity": [0, -1, 2**64],
    "channel_capacity": [{"a*": 0}],
    "ip_address": ["", "tcp://127.0.0.1"],
    "port": [0, 65536],
    "server_key": [""],
    "client_key": [""],
    "prefix": ["my.site", "my site", "x" * 64, "é"],
}


def test_the_tables_cover_every_key():
    assert set(WRONG_TYPES) == set(LAYER_KEYS) == set(BAD_VALUES) | {"embedded"}


def build_layer(**config: Any) -> Any:
    return ChannelsServerLayer(**config)


def build_process_client(**config: Any) -> Any:
    client = ProcessClient(config)
    client.close()
    return client


def build_process_client_keywords(**config: Any) -> Any:
    client = ProcessClient(**config)
    client.close()
    return client


BUILDERS = {
    "layer": build_layer,
    "ProcessClient(config)": build_process_client,
    "ProcessClient(**options)": build_process_client_keywords,
    "LayerOptions": LayerOptions.from_config,
}


def build(kind: str, config: dict[str, Any]) -> Any:
    builder = BUILDERS[kind]
    if kind == "LayerOptions":
        return builder(config)
    return builder(**config)


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("key", sorted(WRONG_TYPES))
def test_a_wrong_type_is_a_type_error_naming_the_key_and_type(kind, key):
    value, expected = WRONG_TYPES[key]
    with pytest.raises(TypeError) as info:
        build(kind, {key: value})
    assert type(info.value) is TypeError
    assert f"'{key}'" in str(info.value) and expected in str(info.value), str(info.value)


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in BAD_VALUES.items() for v in vs], ids=repr)
def test_a_bad_value_is_a_value_error_naming_the_key(kind, key, value):
    with pytest.raises(ValueError) as info:
        build(kind, {key: value})
    assert type(info.value) is ValueError
    assert f"'{key}'" in str(info.value), str(info.value)


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize(
    ("typo", "suggestion"), [("adress", "address"), ("capcity", "capacity"), ("expiry_s", "expiry"), ("hosts", None)]
)
def test_an_unknown_key_is_a_type_error_with_the_closest_key(kind, typo, suggestion):
    with pytest.raises(TypeError) as info:
        build(kind, {typo: "tcp://127.0.0.1:5556"})
    message = str(info.value)
    assert f"'{typo}'" in message
    if suggestion:
        assert f"did you mean '{suggestion}'?" in message
    else:
        assert "did you mean" not in message


def test_an_address_without_a_scheme_shows_the_right_forms():
    with pytest.raises(ValueError) as info:
        LayerOptions.from_config({"address": "127.0.0.1:5556"})
    message = str(info.value)
    assert "'address'" in message and "has no scheme" in message
    assert "write tcp://127.0.0.1:5556" in message
    assert "ipc:///" in message and "inproc://" in message


@pytest.mark.parametrize("cls", [AsyncClient, SyncClient])
def test_raw_clients_check_their_options_when_built(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"^{name} option 'address' = '127.0.0.1:5556' has no scheme"):
        cls("127.0.0.1:5556")
    with pytest.raises(TypeError, match=rf"^{name} option 'timeout' must be a number"):
        cls(timeout="5")
    with pytest.raises(TypeError, match=rf"^{name} option 'prefetch' must be an int, not bool"):
        cls(prefetch=True)
    with pytest.raises(ValueError, match=rf"^{name} option 'heartbeat' must be a finite number of seconds > 0"):
        cls(heartbeat=-1)
    with pytest.raises(TypeError, match=rf"^{name} option 'shared' must be True or False"):
        cls(shared="yes")
    with pytest.raises(TypeError, match=rf"^unknown {name} option 'adress' \(did you mean 'address'\?\)"):
        cls(adress="tcp://127.0.0.1:5556")


def test_ints_are_fine_for_float_keys_and_are_stored_as_floats():
    options = LayerOptions.from_config({"timeout": 3, "expiry": 10, "idle_return": 2})
    assert options.client.timeout == 3.0 and type(options.client.timeout) is float
    assert options.expiry == 10.0 and type(options.expiry) is float


def test_every_problem_is_reported():
    problems = config_problems({"adress": "x", "expiry": "60", "capacity": 0, "timeout": 1})
    assert [(p.key, type(p.error), p.unknown) for p in problems] == [
        ("adress", TypeError, True),
        ("expiry", TypeError, False),
        ("capacity", ValueError, False),
    ]
    assert config_problems({}) == []
    assert [type(p.error) for p in config_problems(["not", "a", "dict"])] == [TypeError]


def test_defaults_live_in_one_place():
    options = ClientOptions()
    assert options.address == DEFAULT_ADDRESS == "tcp://127.0.0.1:5556"
    assert options.max_message_size == DEFAULT_MAX_MESSAGE_SIZE == 16 << 20
    assert (options.timeout, options.heartbeat, options.prefetch, options.process_prefetch) == (5.0, 1.0, 16, 128)
    assert (options.idle_return, options.embedded, options.embedded_idle_timeout) == (1.0, False, 60.0)
    layer = LayerOptions.from_config({})
    assert (layer.expiry, layer.group_expiry, layer.capacity, layer.channel_capacity) == (60.0, 86400.0, 100, None)
    assert layer.client.embedded is True  # a loopback address: the layer embeds by default
    assert LayerOptions.from_config({"address": "inproc://x"}).client.embedded is False
    assert LayerOptions.from_config({"address": "tcp://10.0.0.1:5556"}).client.embedded is False
    assert layer_options({"port": 7000})["address"] == "tcp://127.0.0.1:7000"
    assert layer_options({"address": "tcp://127.0.0.1:1", "port": 7000})["address"] == "tcp://127.0.0.1:1"


def test_default_address_is_still_importable_from_the_server():
    from django_message_broker.server.server import DEFAULT_ADDRESS as server_default

    assert server_default == DEFAULT_ADDRESS


def test_the_client_does_not_import_the_server_shell():
    for path in (SRC / "client").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("server"), (path.name, node.module)


def test_the_options_module_is_pure():
    tree = ast.parse((SRC / "options.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"zmq", "asyncio", "django", "channels"}, imported


def test_the_embedded_broker_gets_the_clients_max_message_size(embedded_starts):
    from django_message_broker import embedded

    started = embedded_starts
    with pytest.raises(RuntimeError, match="exited"):
        embedded.ensure_broker("tcp://127.0.0.1:1", max_body=1234, timeout=1)
    (command,) = started
    assert command[command.index("--max-body") + 1] == "1234"


def test_the_dataclasses_check_themselves_when_built_directly():
    with pytest.raises(ValueError, match="option 'prefetch'"):
        ClientOptions(prefetch=0)
    with pytest.raises(TypeError, match="option 'expiry'"):
        LayerOptions(expiry="60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="option 'capacity'"):
        LayerOptions(capacity=0)
    with pytest.raises(AttributeError):
        ClientOptions().timeout = 1.0  # type: ignore[misc]


def test_the_embedded_broker_keeps_durable_queues_in_the_data_home(embedded_starts, monkeypatch, tmp_path):
    from django_message_broker import embedded

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    with pytest.raises(RuntimeError, match="exited"):
        embedded.ensure_broker("tcp://127.0.0.1:1", timeout=1)
    (command,) = embedded_starts
    data_dir = command[command.index("--data-dir") + 1]
    assert data_dir.startswith(str(tmp_path / "share" / "django-message-broker" / "tcp-127.0.0.1-1-"))
