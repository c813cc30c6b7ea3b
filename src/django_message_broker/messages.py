"""Channel-layer messages: what may be sent, and its encoding. Pure.

A message is a dict that channels_redis could carry too: msgpack's own
types, nested (dict, list, tuple, str, bytes, int, float, bool, None;
subclasses such as Django's ``SafeString`` count as their base type). A
tuple arrives as a list, a bytearray or memoryview as bytes, as with
channels_redis. Everything else (set, Decimal, UUID, date, datetime, custom
objects, keys other than str or bytes, ints outside [-2**63, 2**64 - 1]) is
refused with ``TypeError`` in the caller. msgspec could encode most of those,
but they would arrive as another type (a set as a list, a Decimal as a str),
and channels_redis refuses them: code written against this layer must keep
working on channels_redis. (channels_redis packs int keys but cannot unpack
them: the receiver fails. Here the sender does.)

The check walks the message before msgspec encodes it; values of the common
scalar types cost one set lookup each.

Decoding once per process. A group_send reaches a process once, however
many of its channels are members (``client._state.Shared``);
``decode_shared`` decodes that body once for them all. Every receiver still
gets a dict of its own, as with the in-memory layer (which deep-copies on
send), so a receiver may change its message without the others seeing it.
(channels_redis also sends a group message once per process, but hands the
very same dict to every member there: docs/channels-redis-deviations.md,
row 11.) A message
whose values are all immutable (str, bytes, int, float, bool, None: most
Channels events) is decoded once and each receiver gets a shallow copy,
which is then as independent as a fresh decode and costs a fraction of it.
A message with a nested dict or list is decoded afresh for each receiver
(a shallow copy would share the nested objects; ``copy.deepcopy`` costs
more than decoding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import msgspec

if TYPE_CHECKING:
    from .client._state import Shared

__all__ = ["IntOutOfRange", "decode_message", "decode_shared", "encode_message"]


class IntOutOfRange(TypeError, OverflowError):
    """An int outside [-2**63, 2**64 - 1]: a ``TypeError`` like every other
    refused value, and the ``OverflowError`` channels_redis raises."""


def _base_type(value: Any) -> Any:
    """msgspec's hook for the subclasses it does not encode itself (and
    msgpack does): a str subclass such as Django's ``SafeString``, bytes,
    int or float subclasses. Only checked values reach it."""
    if isinstance(value, str):
        return "".join((value,))  # an exact str (str() may return the subclass)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise NotImplementedError


_encoder = msgspec.msgpack.Encoder(enc_hook=_base_type)
_decoder = msgspec.msgpack.Decoder(dict)

#: Exact types that need no further look (the fast path).
_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})
#: msgpack's (and channels_redis') nesting limit.
_MAX_DEPTH = 511
_ALLOWED = "dict, list, tuple, str, bytes, int, float, bool and None"


def encode_message(message: Any) -> bytes:
    """``message`` as msgpack; ``TypeError`` if it is not a dict of the
    types channels_redis carries (see the module docstring)."""
    if type(message) is not dict and not isinstance(message, dict):
        raise TypeError(f"a channel layer message must be a dict, not {type(message).__name__}")
    try:
        _check_dict(message, 0)
    except RecursionError:  # a cycle, or nesting deeper than Python's stack
        raise TypeError("message is nested too deeply (or contains itself)") from None
    try:
        return _encoder.encode(message)
    except OverflowError as exc:
        raise IntOutOfRange(f"message cannot be serialized: {exc}") from None
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"message cannot be serialized: {exc}") from None


def decode_message(body: bytes) -> dict[str, Any]:
    return _decoder.decode(body)  # type: ignore[no-any-return]


_IMMUTABLE = frozenset({str, bytes, int, float, bool, type(None)})
_NESTED = object()  # in a Shared slot: the message holds containers; decode each time


def decode_shared(body: bytes, shared: Optional[Shared]) -> dict[str, Any]:
    """``decode_message(body)``, decoded once for every receiver of a shared
    body (see the module docstring): each caller gets its own dict. The slot
    keeps a pristine decoded copy that nobody is handed, so readers on other
    threads may copy it at any time."""
    if shared is None:
        return _decoder.decode(body)  # type: ignore[no-any-return]
    value = shared.value
    if value is None:
        value = _decoder.decode(body)
        if any(type(item) not in _IMMUTABLE for item in value.values()):
            shared.value = _NESTED
            return value  # type: ignore[no-any-return]
        shared.value = value
    elif value is _NESTED:
        return _decoder.decode(body)  # type: ignore[no-any-return]
    return dict(value)


def _check_dict(value: dict, depth: int, _scalars: frozenset = _SCALARS, _str: type = str) -> None:
    # One pass, names bound as locals: ~50 ns a key on CPython 3.11 (encode alone: ~25).
    for key, item in value.items():
        if type(key) is not _str or type(item) not in _scalars:
            if not isinstance(key, (str, bytes)):
                raise TypeError(
                    f"message key {key!r} ({_name(key)}): keys must be str or bytes (as for channels_redis)"
                )
            if type(item) not in _scalars:
                _check_value(item, depth + 1, key)


def _check_value(value: Any, depth: int, where: Any) -> None:
    if depth > _MAX_DEPTH:
        raise TypeError(f"message is nested too deeply (over {_MAX_DEPTH} levels, or contains itself)")
    kind = type(value)
    if kind is dict:
        _check_dict(value, depth)
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) not in _SCALARS:
                _check_value(item, depth + 1, where)
    elif isinstance(value, (str, bytes, bytearray, memoryview, int, float)):
        pass  # subclasses (SafeString, IntEnum...) and buffers, as msgpack takes them
    elif isinstance(value, dict):
        _check_dict(value, depth)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, depth + 1, where)
    else:
        raise TypeError(
            f"message[{where!r}] holds a {_name(value)}: a channel layer message may hold only {_ALLOWED} "
            "(what channels_redis carries); convert it first (e.g. str(), list(), .isoformat())"
        )


def _name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
