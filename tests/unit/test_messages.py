"""Layer messages carry exactly what channels_redis (msgpack) carries."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import msgspec
import pytest
from django.utils.safestring import SafeString

from django_message_broker.client._state import Shared
from django_message_broker.messages import decode_message, decode_shared, encode_message


class Color(enum.IntEnum):
    RED = 1


class Markup(str):
    """Like Django's SafeString: a str subclass."""


class Bin(bytes):
    pass


class Num(float):
    pass


class Int(int):
    pass


@dataclasses.dataclass
class Point:
    x: int


class Struct(msgspec.Struct):
    x: int


def round_trip(message: dict[str, Any]) -> dict[str, Any]:
    return decode_message(encode_message(message))


def test_native_types_round_trip_unchanged():
    message = {
        "type": "t",
        "str": "é ☃",
        "bytes": b"\x00\xff",
        "int": -(2**63),
        "uint": 2**64 - 1,
        "float": 1.5,
        "bool": True,
        "none": None,
        "list": [1, "two", [3.0, {"four": None}]],
        "dict": {"nested": {"deep": [b"x"]}},
        b"bytes-key": 1,
    }
    assert round_trip(message) == message


@pytest.mark.parametrize(
    ("value", "arrives_as"),
    [
        ((1, 2), [1, 2]),
        (((1, (2,)),), [[1, [2]]]),
        (bytearray(b"ab"), b"ab"),
        (memoryview(b"ab"), b"ab"),
        (Markup("<b>"), "<b>"),
        (SafeString("<i>"), "<i>"),
        (Bin(b"x"), b"x"),
        (Num(2.5), 2.5),
        (Int(3), 3),
        (Color.RED, 1),
        (collections.OrderedDict(a=1), {"a": 1}),
    ],
    ids=[
        "tuple",
        "nested-tuple",
        "bytearray",
        "memoryview",
        "str-subclass",
        "SafeString",
        "bytes-subclass",
        "float-subclass",
        "int-subclass",
        "IntEnum",
        "OrderedDict",
    ],
)
def test_what_msgpack_takes_arrives_as_its_base_type(value, arrives_as):
    received = round_trip({"v": value})["v"]
    assert received == arrives_as and type(received) is type(arrives_as)


REFUSED = [
    ({1, 2}, "set"),
    (frozenset({1}), "frozenset"),
    (decimal.Decimal("1.5"), "decimal.Decimal"),
    (uuid.UUID(int=1), "uuid.UUID"),
    (datetime.date(2026, 1, 1), "datetime.date"),
    (datetime.datetime(2026, 1, 1), "datetime.datetime"),
    (datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), "datetime.datetime"),
    (datetime.time(1, 2), "datetime.time"),
    (datetime.timedelta(1), "datetime.timedelta"),
    (object(), "object"),
    (Point(1), "Point"),
    (Struct(1), "Struct"),
    (1j, "complex"),
]


@pytest.mark.parametrize(("value", "name"), REFUSED, ids=[name for _, name in REFUSED])
@pytest.mark.parametrize("where", ["top", "in-list", "in-tuple", "in-dict"])
def test_other_types_are_refused_with_type_error(value, name, where):
    message = {
        "top": {"v": value},
        "in-list": {"v": [1, [2, value]]},
        "in-tuple": {"v": (1, value)},
        "in-dict": {"v": {"a": {"b": value}}},
    }[where]
    with pytest.raises(TypeError) as info:
        encode_message(message)
    assert name in str(info.value) and "channels_redis" in str(info.value)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, [2**70]], ids=["2**64", "-2**63-1", "nested"])
def test_ints_outside_64_bits_are_refused(value):
    with pytest.raises(TypeError, match="int") as info:
        encode_message({"v": value})
    assert isinstance(info.value, OverflowError)  # as msgpack (channels_redis) raises


@pytest.mark.parametrize("key", [1, 1.5, None, (1, 2), True], ids=repr)
def test_keys_other_than_str_or_bytes_are_refused(key):
    with pytest.raises(TypeError, match="key"):
        encode_message({"type": "t", "nested": {key: 1}})


@pytest.mark.parametrize("message", [["a"], "s", b"b", 5, None, {1, 2}], ids=repr)
def test_a_message_must_be_a_dict(message):
    with pytest.raises(TypeError, match="must be a dict"):
        encode_message(message)


def test_cycles_and_deep_nesting_are_refused():
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(TypeError, match="nested"):
        encode_message(cyclic)
    deep: Any = "x"
    for _ in range(600):
        deep = [deep]
    with pytest.raises(TypeError, match="nested"):
        encode_message({"deep": deep})
    shallow: Any = "x"
    for _ in range(400):
        shallow = [shallow]
    assert round_trip({"deep": shallow}) == {"deep": shallow}


# -- decoding a group_send's body once per process (decode_shared) ----------------------
def test_decode_shared_without_a_slot_is_decode_message():
    body = encode_message({"type": "a", "n": 1})
    assert decode_shared(body, None) == decode_message(body)


def test_a_flat_shared_message_is_decoded_once_and_each_receiver_gets_its_own_dict(monkeypatch):
    from django_message_broker import messages

    body = encode_message({"type": "chat.message", "text": "hi", "n": 3, "f": 1.5, "b": b"x", "ok": True, "z": None})
    decoded: list[bytes] = []
    real = messages._decoder

    class Counting:
        def decode(self, data: bytes) -> Any:
            decoded.append(data)
            return real.decode(data)

    monkeypatch.setattr(messages, "_decoder", Counting())
    slot = Shared()
    first, second, third = (decode_shared(body, slot) for _ in range(3))
    assert len(decoded) == 1  # once for the three receivers
    assert first == second == third == decode_message(body)
    assert first is not second and second is not third and first is not third
    first["text"] = "changed"  # a receiver that changes its message...
    del second["n"]
    assert third["text"] == "hi" and third["n"] == 3  # ...changes nobody else's
    assert decode_shared(body, slot) == decode_message(body)


def test_a_nested_shared_message_is_decoded_for_each_receiver():
    body = encode_message({"type": "a", "data": {"items": [1, 2]}, "tags": ["x"]})
    slot = Shared()
    first, second = decode_shared(body, slot), decode_shared(body, slot)
    assert first == second == decode_message(body)
    first["data"]["items"].append(3)  # nested objects are not shared either
    first["tags"].clear()
    assert second["data"] == {"items": [1, 2]} and second["tags"] == ["x"]
    assert decode_shared(body, slot) == decode_message(body)
