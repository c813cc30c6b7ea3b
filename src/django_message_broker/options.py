"""Every configuration key, its default and its check, in one place.

``ClientOptions`` (frozen, like h2's ``H2Configuration``) holds the options
of a connection to the broker; ``AsyncClient``, ``SyncClient``, the layer
and ``ProcessClient`` all build one. ``LayerOptions`` adds the keys of a
Channels layer's ``CONFIG`` (``expiry``, ``capacity``...). Both check every
value when they are built, so a mistake fails where it was made:

- an unknown key (a typo) is a ``TypeError`` naming it, with the closest
  valid key as a suggestion;
- a value of the wrong type is a ``TypeError`` naming the key and the type
  expected (``bool`` is not a number here; an ``int`` is fine for a float);
- a value of the right type but out of range (a negative timeout, capacity
  0, NaN, an address without a scheme) is a ``ValueError`` naming the key.

``config_problems`` returns every problem of a ``CONFIG`` dict at once (the
system check reports each one); ``LayerOptions.from_config`` raises the
first. Pure: no zmq, asyncio or Django.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

from ._memory import parse_size
from .protocol import MAX_CREDIT, MAX_PREFIX_LENGTH, MAX_TTL

__all__ = [
    "CLIENT_KEYS",
    "DEFAULT_ADDRESS",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "LAYER_KEYS",
    "ClientOptions",
    "ConfigProblem",
    "LayerOptions",
    "check_capacity",
    "check_timeout",
    "check_ttl",
    "config_problems",
    "is_local_address",
    "unknown_option",
]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5556"
#: The largest message (encoded body), client and broker side: what uvicorn
#: takes as one websocket frame. channels_redis has no limit of its own.
DEFAULT_MAX_MESSAGE_SIZE = 16 << 20
#: The largest int a capacity or size may be (it travels as a msgpack int64).
_MAX_INT = (1 << 63) - 1

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
_ADDRESS_FORMS = "tcp://127.0.0.1:5556, ipc:///path/to/socket or inproc://name"


def is_local_address(address: str) -> bool:
    """True for addresses only this host can serve: ipc://, inproc://, loopback TCP."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if address.startswith("tcp://"):
        host = address[len("tcp://") :].rsplit(":", 1)[0]
        return host in _LOCAL_HOSTS or host.startswith("127.")
    return False


# -- checks: (key, value) -> the value to keep; raise TypeError/ValueError ------
def _type_name(value: Any) -> str:
    return type(value).__name__


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number of seconds (int or float), not {_type_name(value)}: {value!r}")
    return float(value)


def _seconds(key: str, value: Any) -> float:
    """A finite number of seconds > 0."""
    seconds = _number(key, value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{key} must be a finite number of seconds > 0, not {value!r}")
    return seconds


def _ttl(key: str, value: Any) -> float:
    seconds = _seconds(key, value)
    if seconds > MAX_TTL:
        raise ValueError(f"{key} must be at most {MAX_TTL:g} seconds (a year), not {value!r}")
    return seconds


def _int_at_least(low: int, high: int = _MAX_INT) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an int, not {_type_name(value)}: {value!r}")
        if not low <= value <= high:
            bounds = f">= {low}" if high == _MAX_INT else f"in [{low}, {high}]"
            raise ValueError(f"{key} must be an int {bounds}, not {value!r}")
        return int(value)

    return check


def _memory_size(key: str, value: Any) -> Optional[int]:
    """``None`` (the broker's default), bytes as an int, or text: ``"256MB"``, ``"1GiB"``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{key} must be None, an int or a size such as '256MB', not {_type_name(value)}: {value!r}")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be True or False, not {_type_name(value)}: {value!r}")
    return value


def _address(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a str such as {_ADDRESS_FORMS}, not {_type_name(value)}: {value!r}")
    scheme, sep, rest = value.partition("://")
    if not sep:
        example = f"tcp://{value}" if re.fullmatch(r"[\w.\-\[\]:]+:\d+", value) else "tcp://127.0.0.1:5556"
        raise ValueError(f"{key} = {value!r} has no scheme: write {example} (the forms are {_ADDRESS_FORMS})")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not (colon and host and host != "*" and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{key} = {value!r} is not a tcp://host:port address with a port in [1, 65535]")
    elif scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"{key} = {value!r} has no path or name after {scheme}://")
    else:
        raise ValueError(f"{key} = {value!r}: the scheme must be tcp, ipc or inproc ({_ADDRESS_FORMS})")
    return value


def _key_file(key: str, value: Any) -> Optional[str]:
    """A CURVE key: ``None``, or a certificate file's path (or, for
    ``server_key``, the 40-character Z85 text). The file itself is read by
    the client (``keys.client_curve``), which names what is wrong with it."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a certificate file's path (str), not {_type_name(value)}: {value!r}")
    if not value:
        raise ValueError(f"{key} must not be empty (None: no CURVE)")
    return value


def _host(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a str (a host name or IP address), not {_type_name(value)}: {value!r}")
    if not value or "://" in value or "/" in value:
        raise ValueError(f"{key} must be a host name or IP address such as '127.0.0.1', not {value!r}")
    return value


_capacity = _int_at_least(1)


def _prefix(key: str, value: Any) -> Optional[str]:
    """A namespace: ``None`` (derive it: ``namespace.default_prefix``), ``""``
    (none), or letters, digits, ``-`` and ``_`` (no dot)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a str (a namespace such as 'mysite'), not {_type_name(value)}: {value!r}")
    if len(value) > MAX_PREFIX_LENGTH or not re.fullmatch(r"[a-zA-Z\d\-_]*", value):
        raise ValueError(
            f"{key} must be at most {MAX_PREFIX_LENGTH} letters, digits, '-' or '_' ('' for no namespace), "
            f"not {value!r}"
        )
    return value


def _channel_capacity(key: str, value: Any) -> Optional[dict[Any, int]]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be a dict of {{pattern: capacity}}, not {_type_name(value)}: {value!r}")
    for pattern, limit in value.items():
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError(f"{key}: pattern {pattern!r} must be a glob str or a compiled regex")
        _capacity(f"{key}[{pattern!r}]", limit)
    return dict(value)


# -- per-call checks (the raw clients' ttl, capacity, timeout) ----------------------
def check_ttl(name: str, ttl: Any) -> float:
    """A message's or membership's time to live: a number in (0, a year]."""
    if type(ttl) is float and 0 < ttl <= MAX_TTL:  # the common case (NaN fails)
        return ttl
    return _ttl(name, ttl)


def check_capacity(name: str, capacity: Any) -> int:
    """An int >= 1."""
    if type(capacity) is int and 0 < capacity <= _MAX_INT:
        return capacity
    return _capacity(name, capacity)


def check_timeout(name: str, timeout: Any) -> float:
    """A finite number of seconds >= 0."""
    seconds = _number(name, timeout)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {timeout!r}")
    return seconds


# -- the options ------------------------------------------------------------------
def _field(default: Any, check: Callable[[str, Any], Any], doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """The options of a connection to the broker, checked (see the module
    docstring). Equal options may share one connection per process."""

    address: str = _field(DEFAULT_ADDRESS, _address, "the broker's address")
    timeout: float = _field(5.0, _seconds, "seconds a request waits for the broker (BrokerUnavailable)")
    heartbeat: float = _field(1.0, _seconds, "seconds between heartbeats; 3 missed: reconnect")
    prefetch: int = _field(16, _int_at_least(1, MAX_CREDIT), "messages of a normal channel fetched ahead")
    process_prefetch: int = _field(128, _int_at_least(1, MAX_CREDIT), "the same for a process (!) channel")
    idle_return: float = _field(1.0, _seconds, "seconds without a receive before unread messages go back")
    embedded: bool = _field(False, _bool, "start a broker on this host if none answers")
    embedded_idle_timeout: float = _field(60.0, _seconds, "seconds an idle embedded broker lives")
    embedded_max_memory: Optional[int] = _field(
        None,
        _memory_size,
        "bytes of queued messages an embedded broker holds (int, or '256MB'); None: a quarter of physical memory",
    )
    max_message_size: int = _field(
        DEFAULT_MAX_MESSAGE_SIZE, _int_at_least(1), "largest encoded message in bytes (MessageTooLarge)"
    )
    server_key: Optional[str] = _field(
        None, _key_file, "CURVE: the broker's public certificate file, or its Z85 text (docs/security.md)"
    )
    client_key: Optional[str] = _field(None, _key_file, "CURVE: this client's secret certificate file")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = field.metadata["check"](f"option {field.name!r}", getattr(self, field.name))
            object.__setattr__(self, field.name, value)  # ints -> floats for float keys

    @classmethod
    def checked(cls, owner: str, **options: Any) -> ClientOptions:
        """``ClientOptions(**options)``, with errors naming ``owner``."""
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{owner} {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CLIENT_KEYS = tuple(field.name for field in dataclasses.fields(ClientOptions))
_CLIENT_CHECKS = {field.name: field.metadata["check"] for field in dataclasses.fields(ClientOptions)}
#: The layer's own keys and their checks.
_LAYER_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "expiry": _ttl,
    "group_expiry": _ttl,
    "capacity": _capacity,
    "channel_capacity": _channel_capacity,
    "ip_address": _host,  # the predecessor's spelling of the address
    "port": _int_at_least(1, 65535),
    "prefix": _prefix,
}
#: Every key a layer's ``CONFIG`` (and ``ProcessClient``) accepts.
LAYER_KEYS = CLIENT_KEYS + tuple(_LAYER_CHECKS)


def unknown_option(owner: str, key: Any, valid: Sequence[str]) -> TypeError:
    """The error for an unknown option ``key``, with difflib's closest valid one."""
    if not isinstance(key, str):
        return TypeError(f"{owner} option names are str, not {_type_name(key)}: {key!r}")
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TypeError(f"unknown {owner} option {key!r}{hint}; valid options: {', '.join(sorted(valid))}")


@dataclasses.dataclass(frozen=True)
class ConfigProblem:
    """One problem of a ``CONFIG`` dict: the ``key`` (``None``: the dict
    itself), the ``error`` (``TypeError`` or ``ValueError``) that building
    the layer would raise, and whether the key is ``unknown``."""

    key: Any
    error: Exception
    unknown: bool = False


def config_problems(config: Any, owner: str = "ChannelsServerLayer") -> list[ConfigProblem]:
    """Every problem of a layer ``CONFIG`` (or ``ProcessClient`` options):
    unknown keys, wrong types, bad values. Empty if ``LayerOptions`` can be
    built from it."""
    return _parse(config, owner)[1]


def _parse(config: Any, owner: str) -> tuple[dict[str, Any], list[ConfigProblem]]:
    if not isinstance(config, Mapping):
        return {}, [ConfigProblem(None, TypeError(f"{owner} CONFIG must be a dict, not {_type_name(config)}"))]
    values: dict[str, Any] = {}
    problems: list[ConfigProblem] = []
    for key, value in config.items():
        check = _CLIENT_CHECKS.get(key) or _LAYER_CHECKS.get(key)  # type: ignore[arg-type]
        if check is None:
            problems.append(ConfigProblem(key, unknown_option(owner, key, LAYER_KEYS), unknown=True))
            continue
        if value is None and key in ("address", "embedded", "channel_capacity", "server_key", "client_key", "prefix"):
            continue  # None: the default (the layer decides embedded by address)
        try:
            values[key] = check(f"{owner} option {key!r}", value)
        except (TypeError, ValueError) as exc:
            problems.append(ConfigProblem(key, exc))
    return values, problems


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """A Channels layer's ``CONFIG``, checked: the connection's
    ``ClientOptions`` plus the layer's own keys."""

    client: ClientOptions = dataclasses.field(default_factory=ClientOptions)
    expiry: float = 60.0  # seconds a message lives in a channel
    group_expiry: float = 86400.0  # seconds a group membership lives
    capacity: int = 100  # messages a channel holds (ChannelFull)
    channel_capacity: Optional[dict[Any, int]] = None  # {glob or regex: capacity}
    #: The namespace of channel and group names on the broker, and of
    #: ``flush()``; ``None``: derived from the Django project (see
    #: ``namespace.default_prefix``); ``""``: none (shared with everyone).
    prefix: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.client, ClientOptions):
            raise TypeError(f"client must be a ClientOptions, not {_type_name(self.client)}")
        for name in ("expiry", "group_expiry", "capacity", "channel_capacity", "prefix"):
            object.__setattr__(self, name, _LAYER_CHECKS[name](f"option {name!r}", getattr(self, name)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], owner: str = "ChannelsServerLayer") -> LayerOptions:
        """Check ``config`` (raises the first problem: ``TypeError`` or
        ``ValueError``) and fill in the defaults. ``address`` wins over the
        predecessor's ``ip_address``/``port``; ``embedded`` defaults to True
        for an address only this host serves (ipc://, loopback tcp://)."""
        values, problems = _parse(config, owner)
        if problems:
            raise problems[0].error
        own = ("expiry", "group_expiry", "capacity", "channel_capacity", "prefix")
        layer = {key: values.pop(key) for key in own if key in values}
        host, port = values.pop("ip_address", None), values.pop("port", None)
        if "address" not in values:
            if host is not None or port is not None:
                values["address"] = f"tcp://{host or '127.0.0.1'}:{port or 5556}"
            else:
                values["address"] = DEFAULT_ADDRESS
        if "embedded" not in values:
            # An embedded broker has no secret key, so it cannot serve CURVE.
            address = values["address"]
            values["embedded"] = (
                is_local_address(address) and not address.startswith("inproc://") and "server_key" not in values
            )
        return cls(ClientOptions(**values), **layer)
