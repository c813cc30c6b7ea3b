"""The wire protocol (``protocol.py``) and the exception family
(``exceptions.py``): round trips, hostile input, name rules."""

from __future__ import annotations

import typing

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p

V = bytes([p.VERSION])  # the version byte that starts every header

COMMANDS = typing.get_args(p.Command)
TO_CLIENT = typing.get_args(p.ToClient)

# -- strategies built from the structs' own field types --------------------------
INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
FLOATS = st.floats(allow_nan=False)  # NaN != NaN; infinities round-trip
msgpack_values = st.recursive(
    st.none() | st.booleans() | INT64 | FLOATS | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _for_type(t: msgspec.inspect.Type) -> st.SearchStrategy:
    mi = msgspec.inspect
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return INT64
    if isinstance(t, mi.FloatType):
        return FLOATS
    if isinstance(t, mi.StrType):
        return st.text(max_size=40)
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=40)
    if isinstance(t, mi.ListType):
        return st.lists(_for_type(t.item_type), max_size=8)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_for_type(t.key_type), _for_type(t.value_type), max_size=4)
    if isinstance(t, mi.TupleType):
        return st.tuples(*[_for_type(item) for item in t.item_types])
    if isinstance(t, mi.AnyType):
        return msgpack_values
    if isinstance(t, mi.UnionType):
        return st.one_of([_for_type(u) for u in t.types])
    if isinstance(t, mi.NoneType):
        return st.none()
    raise NotImplementedError(f"no strategy for {t!r}")  # a new field type: teach this test


def struct_strategy(cls: type) -> st.SearchStrategy:
    info = msgspec.inspect.type_info(cls)
    return st.builds(cls, **{f.name: _for_type(f.type) for f in info.fields})


commands = st.one_of([struct_strategy(c) for c in COMMANDS])
to_client = st.one_of([struct_strategy(c) for c in TO_CLIENT])


def test_the_unions_are_what_the_peers_speak():
    assert {c.__name__ for c in COMMANDS} == {
        "Hello", "Send", "GroupSend", "GroupAdd", "GroupDiscard", "Subscribe",
        "Unsubscribe", "Return", "Flush", "Heartbeat", "Stats", "Bye", "Consumed",
        # task queues (the kombu transport)
        "Open", "ExchangeDeclare", "ExchangeDelete", "QueueDeclare", "QueueBind", "QueueUnbind",
        "QueuePurge", "QueueDelete", "Publish", "Consume", "Cancel", "Qos", "Ack", "Reject",
        "Recover", "Get", "CloseSession", "Sync",
    }  # fmt: skip
    assert {c.__name__ for c in TO_CLIENT} == {"Deliver", "Reply", "Welcome", "Flushed", "TaskDeliver", "Ping"}
    tags = [msgspec.inspect.type_info(c).tag for c in COMMANDS + TO_CLIENT]
    assert len(set(tags)) == len(tags)


# -- round trips ----------------------------------------------------------------
@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_command_round_trips(cls, data):
    msg = data.draw(struct_strategy(cls))
    header = p.encode(msg)
    assert header[0] == p.VERSION
    decoded = p.decode_command(header)
    assert type(decoded) is cls
    assert decoded == msg
    # The broker hands the decoder zmq frames and memoryviews, not bytes.
    assert p.decode_command(zmq.Frame(header)) == msg
    assert p.decode_command(memoryview(header)) == msg
    assert p.decode_command(bytearray(header)) == msg


@pytest.mark.parametrize("cls", TO_CLIENT, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_reply_round_trips(cls, data):
    msg = data.draw(struct_strategy(cls))
    header = p.encode(msg)
    decoded = p.decode_to_client(header)
    assert type(decoded) is cls
    assert decoded == msg
    assert p.decode_to_client(zmq.Frame(header)) == msg


@settings(max_examples=50, deadline=None)
@given(msg=commands)
def test_a_command_is_not_a_reply(msg):
    with pytest.raises(p.ProtocolError):
        p.decode_to_client(p.encode(msg))


@settings(max_examples=50, deadline=None)
@given(msg=to_client)
def test_a_reply_is_not_a_command(msg):
    with pytest.raises(p.ProtocolError):
        p.decode_command(p.encode(msg))


def test_defaults_travel():
    assert p.decode_command(p.encode(p.Send(1, "c", 1.0, 5))) == p.Send(1, "c", 1.0, 5, True)
    assert p.decode_to_client(p.encode(p.Reply(3))) == p.Reply(3, 0, "", None)


# -- hostile input --------------------------------------------------------------
def _decode_or_protocol_error(decoder, data):
    try:
        result = decoder(data)
    except p.ProtocolError:
        return None
    # Anything that decodes is one of the union's structs.
    union = COMMANDS if decoder is p.decode_command else TO_CLIENT
    assert isinstance(result, union)
    return result


# Headers whose trailing (ignored) element nests deeper than the decoder recurses.
DEEP_EXTRA = V + b"\x93\x0a\x01" + b"\x91" * 200_000  # Heartbeat(1, <deep array>)
DEEP_MAP = V + b"\x93\x0a\x01" + b"\x81\x00" * 200_000 + b"\x00"
DEEP_VALUE = V + b"\x95\x15\x01\x00\xa0" + b"\x91" * 200_000  # Reply(value=<deep array>)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
@example(data=b"")
@example(data=bytes([p.VERSION]))
@example(data=bytes([p.VERSION]) + b"\xc1")  # never-used msgpack byte
@example(data=bytes([p.VERSION]) + b"\xdd\xff\xff\xff\xff")  # an array that claims 4 G elements
def test_arbitrary_bytes_raise_only_protocol_error(data):
    for decoder in (p.decode_command, p.decode_to_client):
        _decode_or_protocol_error(decoder, data)
        _decode_or_protocol_error(decoder, V + data)  # past the version byte


@pytest.mark.parametrize("data", [DEEP_EXTRA, DEEP_MAP, DEEP_VALUE], ids=["deep-extra", "deep-map", "deep-value"])
def test_deeply_nested_header_raises_protocol_error(data):
    """msgspec recurses into nested arrays (even into an ignored trailing
    element): a hostile header must still be a ProtocolError, never a
    RecursionError that would escape the broker's read loop."""
    for decoder in (p.decode_command, p.decode_to_client):
        try:
            decoder(data)
        except p.ProtocolError:
            pass
        except BaseException as exc:  # short message: the header is 200 kB
            pytest.fail(f"{decoder.__name__} raised {type(exc).__name__}: {exc}")
        else:
            pytest.fail(f"{decoder.__name__} accepted a 200 kB nested header")


@settings(max_examples=150, deadline=None)
@given(
    tag=st.sampled_from([msgspec.inspect.type_info(c).tag for c in COMMANDS + TO_CLIENT] + [0, 13, 19, 23, 255, -1]),
    fields=st.lists(msgpack_values, max_size=6),
)
def test_well_formed_msgpack_with_wrong_fields_raises_only_protocol_error(tag, fields):
    header = V + msgspec.msgpack.encode([tag, *fields])
    for decoder in (p.decode_command, p.decode_to_client):
        _decode_or_protocol_error(decoder, header)


@settings(max_examples=100, deadline=None)
@given(msg=commands | to_client, version=st.integers(0, 255).filter(lambda v: v != p.VERSION))
def test_wrong_version_byte_raises_protocol_error(msg, version):
    header = bytes([version]) + p.encode(msg)[1:]
    with pytest.raises(p.ProtocolError, match="version"):
        p.decode_command(header)
    with pytest.raises(p.ProtocolError, match="version"):
        p.decode_to_client(header)


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x02", bytes([p.VERSION])])
def test_truncated_header_raises_protocol_error(data):
    with pytest.raises(p.ProtocolError):
        p.decode_command(data)


def test_protocol_error_is_a_broker_error():
    assert issubclass(p.ProtocolError, ex.BrokerError)
    assert p.ProtocolError is ex.ProtocolError


# -- names ----------------------------------------------------------------------
GOOD_CHANNELS = [
    "a",
    "chat.room-1_x",
    "a!b",
    "a!",
    "specific.abc123!def",
    "x" * 99,
    "x" * 163,
    "A.B-C_D",
    "a!b-c.d_e",
    "a!é",
]
BAD_CHANNELS = ["", "a!b!c", "a b", "a\n", "abc\n", "a!b\n", "\na", "x" * 164, "!a", "a$", "é", "a/b", "a:b", "a\x00"]


@pytest.mark.parametrize("name", GOOD_CHANNELS)
def test_good_channel_names(name):
    assert p.check_channel_name(name) == name


@pytest.mark.parametrize("name", BAD_CHANNELS)
def test_bad_channel_names(name):
    with pytest.raises(ex.InvalidName) as info:
        p.check_channel_name(name)
    assert isinstance(info.value, TypeError)  # what Channels raises
    assert info.value.name == name


@pytest.mark.parametrize("name", [None, 1, b"abc", ["a"], 1.5, object()])
def test_non_str_names_are_invalid(name):
    for check in (p.check_channel_name, p.check_group_name):
        with pytest.raises(TypeError):
            check(name)
        with pytest.raises(ex.InvalidName):
            check(name)


@pytest.mark.parametrize("name", ["a", "group-1.x_y", "x" * 99])
def test_good_group_names(name):
    assert p.check_group_name(name) == name


@pytest.mark.parametrize("name", ["", "a!b", "a!", "a b", "a\n", "x" * 164, "é"])
def test_bad_group_names(name):
    with pytest.raises(ex.InvalidName):
        p.check_group_name(name)


def test_invalid_name_is_a_type_error():
    assert issubclass(ex.InvalidName, TypeError)
    assert issubclass(ex.InvalidName, ex.BrokerError)


name_chars = st.text(alphabet=st.sampled_from("ab9-_.!é \n$"), max_size=6) | st.text(max_size=4)


@settings(max_examples=300, deadline=None)
@given(name=name_chars | st.text(alphabet="ab!", min_size=95, max_size=105))
def test_names_agree_with_channels(name):
    """Same verdict as Channels' own check, except that a trailing newline
    (which Channels' ``$`` lets through) is refused here."""
    layers = pytest.importorskip("channels.layers")
    base = layers.BaseChannelLayer()
    for ours, theirs in (
        (p.check_channel_name, base.require_valid_channel_name),
        (p.check_group_name, base.require_valid_group_name),
    ):
        try:
            theirs(name)
            channels_ok = not name.endswith("\n")
        except TypeError:
            channels_ok = False
        try:
            ours(name)
            ours_ok = True
        except ex.InvalidName:
            ours_ok = False
        assert ours_ok == channels_ok, (ours.__name__, name)


# -- exceptions over the wire ---------------------------------------------------
EXAMPLES = [
    ex.QueueFull("chat", 3),
    ex.MessageTooLarge(2_000_000, 1 << 20),
    ex.InvalidName("a b", "invalid channel name"),
    ex.SubscriptionError("process channel 'a!' already has another endpoint", "a!"),
    ex.ProtocolError("truncated header"),
    ex.BrokerUnavailable("tcp://127.0.0.1:5556", 0.5),
    ex.ClientClosed("the client is closed"),
    ex.BrokerError("internal error: boom"),
]


def _same(a: ex.BrokerError, b: ex.BrokerError) -> None:
    assert type(a) is type(b)
    assert a.fields() == b.fields()
    assert str(a) == str(b)
    assert a.code == b.code


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_exceptions_round_trip_through_from_wire(exc):
    _same(ex.from_wire(exc.code, str(exc), exc.fields()), exc)


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_exceptions_round_trip_through_an_encoded_reply(exc):
    reply = p.decode_to_client(p.encode(p.error_reply(7, exc)))
    assert isinstance(reply, p.Reply) and reply.req == 7
    assert reply.code == exc.code != 0
    _same(ex.from_wire(reply.code, reply.detail, reply.value), exc)


@settings(max_examples=100, deadline=None)
@given(
    exc=st.one_of(
        st.builds(ex.QueueFull, st.text(max_size=20), st.integers(0, 2**31)),
        st.builds(ex.MessageTooLarge, st.integers(0, 2**40), st.integers(0, 2**40)),
        st.builds(ex.InvalidName, st.text(max_size=20), st.text(max_size=20)),
        st.builds(ex.SubscriptionError, st.text(max_size=20), st.text(max_size=20)),
        st.builds(ex.BrokerUnavailable, st.text(max_size=20), st.floats(0, 1e6)),
        st.builds(ex.ProtocolError, st.text(max_size=20)),
        st.builds(ex.ClientClosed, st.text(max_size=20)),
    )
)
def test_exceptions_round_trip_property(exc):
    reply = p.decode_to_client(p.encode(p.error_reply(1, exc)))
    _same(ex.from_wire(reply.code, reply.detail, reply.value), exc)


def test_invalid_name_with_a_non_str_name_still_travels():
    exc = ex.InvalidName(5, "invalid channel name")
    back = ex.from_wire(exc.code, str(exc), exc.fields())
    assert type(back) is ex.InvalidName and isinstance(back, TypeError)
    assert back.fields() == exc.fields() == {"name": "5", "reason": "invalid channel name"}


def test_unknown_code_is_a_broker_error():
    back = ex.from_wire(1234, "something new", {"x": 1})
    assert type(back) is ex.BrokerError
    assert str(back) == "something new" and back.x == 1
    back = ex.from_wire(1234, "odd fields", [1, 2])
    assert type(back) is ex.BrokerError and str(back) == "odd fields"


def test_every_error_has_a_distinct_nonzero_code():
    classes = [type(e) for e in EXAMPLES]
    codes = [c.code for c in classes]
    assert 0 not in codes and len(set(codes)) == len(codes)
    assert all(issubclass(c, ex.BrokerError) for c in classes)
    assert issubclass(ex.BrokerUnavailable, TimeoutError)


# -- shared bodies: compatible both ways without a new version ----------------------------
def test_shared_bodies_fields_default_off_and_old_decoders_ignore_them():
    assert p.decode_command(p.encode(p.Hello(1, "c", 1.0))).shared_bodies is False
    assert p.decode_to_client(p.encode(p.Deliver("ch", [1.0]))).body_of == []

    class OldHello(msgspec.Struct, array_like=True, tag_field="t", tag=1):  # version 2 before body_of
        req: int
        client_id: str
        heartbeat: float

    class OldDeliver(msgspec.Struct, array_like=True, tag_field="t", tag=20):
        channel: str
        ttls: list[float]
        channels: list[str] = []

    new_hello = p.encode(p.Hello(1, "c", 1.0, shared_bodies=True))
    assert msgspec.msgpack.decode(new_hello[1:], type=OldHello) == OldHello(1, "c", 1.0)  # an old broker
    old_hello = V + msgspec.msgpack.encode(OldHello(1, "c", 1.0))
    assert p.decode_command(old_hello) == p.Hello(1, "c", 1.0, False)  # an old client: no body_of for it
    old_deliver = V + msgspec.msgpack.encode(OldDeliver("", [1.0, 2.0], ["a", "b"]))
    assert p.decode_to_client(old_deliver) == p.Deliver("", [1.0, 2.0], ["a", "b"], [])


def test_a_full_name_cache_forgets_its_older_half():
    cache = p.NameCache(size=4)
    for name in ("a", "b", "c", "d"):
        cache.add(name)
    cache.add("e")  # full: "a" and "b" go, the rest stay
    assert [n in cache for n in "abcde"] == [False, False, True, True, True]
    assert 1 not in cache and p.NameCache().__contains__("x") is False


def test_the_name_cache_holds_the_channels_of_a_large_group():
    """A process receiving from 5,000 channels checks each name from the
    cache, not with a regex on every receive."""
    cache = p.NameCache()
    names = [f"specific.abc!{i}" for i in range(10_000)]
    for name in names:
        cache.add(name)
    assert all(name in cache for name in names)
