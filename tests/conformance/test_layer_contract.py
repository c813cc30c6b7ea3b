"""The Channels layer contract, run against ``ChannelsServerLayer`` ("dmb")
and, as the reference, ``channels_redis``' ``RedisChannelLayer`` ("redis").

One test per behaviour (see /work/shared/research/peers.md section 1). Where
channels_redis does something else, the test asserts what each layer does,
explicitly, and docs/channels-redis-deviations.md lists the difference.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import decimal
import itertools
import json
import logging
import random
import re
import sys
import threading
import time
import uuid
from typing import Any, Optional

import psutil
import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull, MessageTooLarge

#: The logger each layer reports "N of M channels over capacity" on.
CAPACITY_LOGGER = {"dmb": "django_message_broker.layer", "redis": "channels_redis.core"}

#: How long "nothing arrives" is given to prove itself.
QUIET = 0.4


async def recv(layer: Any, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


def redis_cancellation_error(layer_kind: str, exc: BaseException) -> bool:
    """Deviation (docs/channels-redis-deviations.md, row 3): redis-py sometimes
    turns the cancellation of a blocking read (a timed-out or cancelled
    receive) into ``redis.exceptions.TimeoutError``."""
    if layer_kind != "redis":
        return False
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, RedisTimeoutError)


def kind_of(layer: Any) -> str:
    return "redis" if type(layer).__module__.startswith("channels_redis") else "dmb"


async def receive_or_none(layer: Any, channel: str, timeout: float) -> Optional[dict[str, Any]]:
    """The next message, or None if none comes within ``timeout``."""
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return None
    except Exception as exc:
        if redis_cancellation_error(kind_of(layer), exc):
            return None
        raise


async def assert_nothing(layer: Any, channel: str, timeout: float = QUIET) -> None:
    message = await receive_or_none(layer, channel, timeout)
    if message is not None:
        pytest.fail(f"expected nothing on {channel!r}, received {message!r}")


def separate_connections(kind: str, *layers: Any) -> bool:
    """True if each layer has its own connection: its own broker client for
    ours (``client_id``), its own pools for channels_redis (per instance)."""
    ids = [layer.client.client_id if kind == "dmb" else id(layer) for layer in layers]
    return len(set(ids)) == len(ids)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- send / receive --------------------------------------------------------------
async def test_send_receive(layer):
    await layer.send("test-channel-1", {"type": "test.message", "text": "Ahoy-hoy!"})
    await layer.send("test-channel-1", {"type": "test.message", "text": "second"})
    assert await recv(layer, "test-channel-1") == {"type": "test.message", "text": "Ahoy-hoy!"}
    assert await recv(layer, "test-channel-1") == {"type": "test.message", "text": "second"}
    await assert_nothing(layer, "test-channel-1")


async def test_message_types_round_trip(layer):
    message = {
        "type": "test.types",
        "bytes": b"\x00\xff\x01",
        "str": "é ü ☃",
        "int": -(2**63),
        "big": 2**63 - 1,
        "float": 1.5,
        "list": [1, "two", [3.0], {"four": None}],
        "dict": {"nested": {"deep": True}},
        "bool": False,
        "none": None,
    }
    await layer.send("types", message)
    received = await recv(layer, "types")
    assert received == message
    assert isinstance(received["bytes"], bytes)


async def test_fifo_many_messages(make_layer):
    layer = make_layer(capacity=500)
    for n in range(300):
        await layer.send("fifo", {"type": "test.n", "n": n})
    received = [(await recv(layer, "fifo"))["n"] for _ in range(300)]
    assert received == list(range(300))
    await assert_nothing(layer, "fifo")


async def test_new_channel_round_trip(layer):
    channel = await layer.new_channel()
    assert channel.startswith("specific.") and "!" in channel
    layer.require_valid_channel_name(channel)
    await layer.send(channel, {"type": "test.message", "text": "to me"})
    assert await recv(layer, channel) == {"type": "test.message", "text": "to me"}
    other = await layer.new_channel("custom")
    assert other.startswith("custom.") and other != channel


async def test_receive_on_another_instances_process_channel_fails_fast(make_layer):
    """A process-specific channel belongs to the instance whose new_channel()
    made it: another instance's receive fails at once (channels_redis:
    AssertionError "Wrong client prefix"; ours: ForeignChannel, which is an
    AssertionError and our SubscriptionError) instead of waiting for ever."""
    owner, other = make_layer(), make_layer()
    channel = await owner.new_channel()
    with pytest.raises(AssertionError):
        await asyncio.wait_for(other.receive(channel), 2)
    with pytest.raises(AssertionError):
        await asyncio.wait_for(other.receive("specific.not-a-client-prefix!x"), 2)
    await other.send(channel, {"type": "for.owner"})
    assert await recv(owner, channel) == {"type": "for.owner"}


async def test_new_channel_unique_after_random_seed(make_layer):
    first, second = make_layer(), make_layer()
    random.seed(1)
    a = [await first.new_channel() for _ in range(5)]
    random.seed(1)
    b = [await second.new_channel() for _ in range(5)]
    random.seed(1)
    c = [await first.new_channel() for _ in range(5)]
    assert len(set(a + b + c)) == 15
    # the process part (up to "!") differs between the two layer instances
    assert {n.split("!")[0] for n in a} != {n.split("!")[0] for n in b}


async def test_send_to_process_channel_before_anyone_receives(make_layer):
    receiver, sender = make_layer(), make_layer()
    channel = await receiver.new_channel()
    for n in range(3):
        await sender.send(channel, {"type": "test.n", "n": n})
    assert [(await recv(receiver, channel))["n"] for _ in range(3)] == [0, 1, 2]
    await assert_nothing(receiver, channel)


# -- capacity --------------------------------------------------------------------
async def test_send_capacity(make_layer):
    layer = make_layer(capacity=3)
    for n in range(3):
        await layer.send("full-channel", {"type": "test.n", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send("full-channel", {"type": "test.n", "n": 3})
    # another channel is unaffected
    await layer.send("other-channel", {"type": "test.n", "n": 0})
    # and nothing was queued past capacity
    assert [(await recv(layer, "full-channel"))["n"] for _ in range(3)] == [0, 1, 2]
    await assert_nothing(layer, "full-channel")


@pytest.mark.parametrize("receiver", ["same", "other"])
async def test_send_capacity_right_after_a_receive(make_layer, receiver):
    """A receive a moment ago (by this instance or another in the process)
    changes nothing: ``ChannelFull`` comes at exactly ``capacity``. (Our
    layer prefetches for receivers; a message delivered to a process and
    not yet received still counts against the channel.)"""
    sender = make_layer(capacity=3)
    reader = sender if receiver == "same" else make_layer(capacity=3)
    channel = unique("received-then-full")
    for warm in range(2):
        await sender.send(channel, {"type": "warm", "n": warm})
        assert (await recv(reader, channel))["n"] == warm
    for n in range(3):
        await sender.send(channel, {"type": "test.n", "n": n})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"type": "test.n", "n": 3})
    assert [(await recv(reader, channel))["n"] for _ in range(3)] == [0, 1, 2]
    await assert_nothing(reader, channel)
    # Received, so room again: exactly three more.
    for n in range(3):
        await sender.send(channel, {"type": "test.n", "n": n})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"type": "test.n", "n": 3})


async def test_channel_capacity_glob_and_regex(make_layer):
    layer = make_layer(capacity=100, channel_capacity={"one": 1, "glob-*": 1, re.compile(r"^two$"): 2})
    message = {"type": "test.message"}
    await layer.send("one", message)
    with pytest.raises(ChannelFull):
        await layer.send("one", message)
    await layer.send("glob-x", message)
    with pytest.raises(ChannelFull):
        await layer.send("glob-x", message)
    await layer.send("two", message)
    await layer.send("two", message)
    with pytest.raises(ChannelFull):
        await layer.send("two", message)
    # "twofold" matches neither pattern: the default capacity applies
    for _ in range(5):
        await layer.send("twofold", message)


async def test_group_send_honours_channel_capacity(make_layer, layer_kind, caplog):
    caplog.set_level(logging.INFO, logger=CAPACITY_LOGGER[layer_kind])
    layer = make_layer(capacity=100, channel_capacity={"small-*": 1})
    await layer.group_add("capgroup", "small-a")
    await layer.group_add("capgroup", "big-a")
    await layer.group_send("capgroup", {"type": "test.n", "n": 1})
    await layer.group_send("capgroup", {"type": "test.n", "n": 2})
    assert (await recv(layer, "big-a"))["n"] == 1
    assert (await recv(layer, "big-a"))["n"] == 2
    assert (await recv(layer, "small-a"))["n"] == 1
    await assert_nothing(layer, "small-a")
    records = [r for r in caplog.records if r.name == CAPACITY_LOGGER[layer_kind]]
    assert any("1 of 2 channels over capacity" in r.getMessage() for r in records), [r.getMessage() for r in records]


# -- validation -----------------------------------------------------------------
async def test_non_dict_message_rejected(layer, layer_kind):
    # channels_redis checks with ``assert`` (AssertionError); we raise the
    # TypeError the contract uses for bad input. See the deviations doc.
    expected = TypeError if layer_kind == "dmb" else AssertionError
    for bad in (["a", "list"], "a string", b"bytes", 5, None):
        with pytest.raises(expected):
            await layer.send("typed", bad)
    await assert_nothing(layer, "typed", 0.2)


async def test_unserializable_message_rejected(layer, layer_kind):
    # channels_redis lets msgpack's TypeError through; ours raises TypeError too.
    with pytest.raises(TypeError):
        await layer.send("typed", {"type": "test.bad", "value": object()})
    await assert_nothing(layer, "typed", 0.2)


#: msgpack (channels_redis' serializer) has no encoding for these: both layers
#: refuse them with TypeError at send, so code that works on one works on both.
NOT_MSGPACK = [
    pytest.param({1, 2}, id="set"),
    pytest.param(frozenset({1}), id="frozenset"),
    pytest.param(decimal.Decimal("1.5"), id="Decimal"),
    pytest.param(uuid.UUID(int=7), id="UUID"),
    pytest.param(datetime.date(2026, 1, 1), id="date"),
    pytest.param(datetime.datetime(2026, 1, 1, 12, 0), id="naive-datetime"),
    pytest.param(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), id="aware-datetime"),
]


@pytest.mark.parametrize("value", NOT_MSGPACK)
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
async def test_values_msgpack_cannot_carry_are_rejected(layer, value, nested):
    channel = await layer.new_channel()
    await layer.group_add("typed-group", channel)  # channels_redis encodes per member
    message = {"type": "test.bad", "value": {"list": [1, value]} if nested else value}
    with pytest.raises(TypeError):
        await layer.send("typed", message)
    with pytest.raises(TypeError):
        await layer.group_send("typed-group", message)
    await assert_nothing(layer, "typed", 0.2)
    await assert_nothing(layer, channel, 0.2)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1], ids=["2**64", "-2**63-1"])
async def test_ints_over_64_bits_are_rejected(layer, layer_kind, value):
    # msgpack raises OverflowError; ours is that and a TypeError at once
    with pytest.raises(OverflowError) as raised:
        await layer.send("typed", {"type": "test.big", "value": [value]})
    assert layer_kind == "redis" or isinstance(raised.value, TypeError)
    await assert_nothing(layer, "typed", 0.2)


async def test_tuples_arrive_as_lists(layer):
    # msgpack has one array type: both layers deliver a tuple as a list
    await layer.send("tuples", {"type": "test.tuple", "pair": (1, "two"), "nested": [(3, (4,))]})
    assert await recv(layer, "tuples") == {"type": "test.tuple", "pair": [1, "two"], "nested": [[3, [4]]]}


async def test_str_subclasses_arrive_as_str(layer):
    # Django's SafeString (render_to_string's result) travels as a plain str
    from django.utils.safestring import mark_safe

    await layer.send("safe", {"type": "test.safe", "html": mark_safe("<b>hi</b>")})
    received = await recv(layer, "safe")
    assert received == {"type": "test.safe", "html": "<b>hi</b>"} and type(received["html"]) is str


async def test_non_str_keys(layer, layer_kind):
    # channels_redis packs an int key but cannot unpack it (msgpack's
    # strict_map_key): the receiver fails. Ours refuses it at send.
    # Deviations doc, row 10.
    message = {"type": "test.keys", "nested": {1: "one"}}
    if layer_kind == "dmb":
        with pytest.raises(TypeError):
            await layer.send("keys", message)
        await assert_nothing(layer, "keys", 0.2)
    else:
        await layer.send("keys", message)
        with pytest.raises(ValueError):
            await recv(layer, "keys")


BAD_CHANNEL_NAMES = ["=+135!", "a" * 100, "a b", "é", "x!a!b", "", 123, None, b"bytes"]


@pytest.mark.parametrize("name", BAD_CHANNEL_NAMES, ids=repr)
async def test_bad_channel_names_rejected(layer, name):
    with pytest.raises(TypeError):
        await layer.send(name, {"type": "test.message"})
    with pytest.raises(TypeError):
        await asyncio.wait_for(layer.receive(name), 2)
    with pytest.raises(TypeError):
        await layer.group_add("good-group", name)
    with pytest.raises(TypeError):
        await layer.group_discard("good-group", name)


async def test_longest_valid_names_accepted(layer):
    channel, group = "c" * 99, "g" * 99
    await layer.group_add(group, channel)
    await layer.group_send(group, {"type": "test.message"})
    assert await recv(layer, channel) == {"type": "test.message"}


BAD_GROUP_NAMES = ["=+135", "a" * 100, "a b", "a!b", "é", "", 123, None, b"bytes"]


@pytest.mark.parametrize("name", BAD_GROUP_NAMES, ids=repr)
async def test_bad_group_names_rejected(layer, name):
    with pytest.raises(TypeError):
        await layer.group_add(name, "good-channel")
    with pytest.raises(TypeError):
        await layer.group_discard(name, "good-channel")
    with pytest.raises(TypeError):
        await layer.group_send(name, {"type": "test.message"})


# -- groups ----------------------------------------------------------------------
async def test_groups_basic(make_layer):
    layer = make_layer()
    channel_1, channel_2, channel_3 = [await layer.new_channel() for _ in range(3)]
    await layer.group_add("test-group", channel_1)
    await layer.group_add("test-group", channel_2)
    await layer.group_add("test-group", channel_3)
    await layer.group_discard("test-group", channel_2)
    await layer.group_send("test-group", {"type": "message.1"})
    assert (await recv(layer, channel_1))["type"] == "message.1"
    assert (await recv(layer, channel_3))["type"] == "message.1"
    await assert_nothing(layer, channel_2)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "flat.message", "text": "hi", "n": 1},
        {"type": "nested.message", "data": {"items": [1, 2]}, "tags": ["a"]},
    ],
    ids=["flat", "nested"],
)
async def test_group_send_receivers_get_independent_messages(make_layer, layer_kind, message):
    """Ours: every receiver of a group_send gets a message of its own, and
    changing it changes nobody else's (a process's shared body is decoded
    once and copied, or decoded again when the message nests containers).
    Deviation (docs/channels-redis-deviations.md, row 11): channels_redis
    sends a group message once per process too, and hands the very same
    dict to every member's receive in that process."""
    layer = make_layer()
    channels = [await layer.new_channel() for _ in range(3)]
    for channel in channels:
        await layer.group_add("independent", channel)
        await layer.send(channel, {"type": "warm.up"})  # receiving grants credit (ours): the
        assert (await recv(layer, channel))["type"] == "warm.up"  # group_send then comes in one piece
    await layer.group_send("independent", message)
    got = [await recv(layer, channel) for channel in channels]
    assert got == [message] * 3
    if layer_kind == "redis":
        assert got[0] is got[1] is got[2]
        return
    assert got[0] is not got[1] and got[1] is not got[2] and got[0] is not got[2]
    for key in list(got[0]):
        if isinstance(got[0][key], (dict, list)):
            got[0][key].clear()
        else:
            got[0][key] = "changed"
    got[1].clear()
    assert got[2] == message
    await layer.group_send("independent", message)
    assert [await recv(layer, channel) for channel in channels] == [message] * 3


async def test_groups_across_layer_instances(make_layer, layer_kind):
    member, sender = make_layer(separate=True), make_layer(separate=True)
    assert separate_connections(layer_kind, member, sender)
    channel = await member.new_channel()
    await member.group_add("cross", channel)
    await member.group_add("cross", "cross-normal")
    await sender.group_send("cross", {"type": "from.other"})
    assert (await recv(member, channel))["type"] == "from.other"
    assert (await recv(member, "cross-normal"))["type"] == "from.other"


async def test_group_add_idempotent(layer):
    channel = await layer.new_channel()
    for _ in range(3):
        await layer.group_add("idem", channel)
    await layer.group_send("idem", {"type": "once"})
    assert (await recv(layer, channel))["type"] == "once"
    await assert_nothing(layer, channel)


async def test_group_discard_of_absent_channel_is_noop(layer):
    member = await layer.new_channel()
    await layer.group_add("absent", member)
    await layer.group_discard("absent", "never-added")
    await layer.group_discard("absent", "never-added")
    await layer.group_send("absent", {"type": "still.here"})
    assert (await recv(layer, member))["type"] == "still.here"
    await assert_nothing(layer, "never-added")


async def test_group_discard_before_any_add(layer):
    await layer.group_discard("no-such-group", "some-channel")
    await layer.group_send("no-such-group", {"type": "into.the.void"})
    await assert_nothing(layer, "some-channel")
    # the group works normally afterwards
    await layer.group_add("no-such-group", "some-channel")
    await layer.group_send("no-such-group", {"type": "now.a.member"})
    assert (await recv(layer, "some-channel"))["type"] == "now.a.member"


async def test_group_send_to_full_members_does_not_raise_and_logs(make_layer, layer_kind, caplog):
    caplog.set_level(logging.INFO, logger=CAPACITY_LOGGER[layer_kind])
    layer = make_layer(capacity=3)
    for name in ("full-a", "full-b", "full-c"):
        await layer.group_add("fullgroup", name)
    for n in range(3):
        await layer.send("full-a", {"type": "direct", "n": n})
    await layer.group_send("fullgroup", {"type": "group", "n": 0})  # must not raise
    for name in ("full-b", "full-c"):
        assert (await recv(layer, name)) == {"type": "group", "n": 0}
    assert [(await recv(layer, "full-a"))["type"] for _ in range(3)] == ["direct"] * 3
    await assert_nothing(layer, "full-a")
    records = [r for r in caplog.records if r.name == CAPACITY_LOGGER[layer_kind]]
    assert any("1 of 3 channels over capacity" in r.getMessage() for r in records), [r.getMessage() for r in records]
    # many more sends to a full member still never raise
    for n in range(3):
        await layer.send("full-b", {"type": "direct", "n": n})
    for n in range(10):
        await layer.group_send("fullgroup", {"type": "group", "n": n})


async def test_three_channels_of_one_process_each_get_one_copy(layer):
    channels = [await layer.new_channel() for _ in range(3)]
    for channel in channels:
        await layer.group_add("same-prefix", channel)
    await layer.group_send("same-prefix", {"type": "copy"})
    for channel in channels:
        assert (await recv(layer, channel))["type"] == "copy"
    for channel in channels:
        await assert_nothing(layer, channel, 0.2)


# -- expiry ----------------------------------------------------------------------
async def test_message_expiry(make_layer):
    # channels_redis removes expired messages with whole-second granularity
    # (``int(time.time()) - int(expiry)``): 2.1 s is past expiry=1 for both.
    layer = make_layer(expiry=1)
    await layer.send("expiring", {"type": "old"})
    await layer.send("expiring-unread", {"type": "old"})
    await asyncio.sleep(2.1)
    await layer.send("expiring", {"type": "new"})
    assert (await recv(layer, "expiring"))["type"] == "new"
    await assert_nothing(layer, "expiring")
    await assert_nothing(layer, "expiring-unread")


async def test_group_expiry(make_layer):
    layer = make_layer(group_expiry=1)
    channel = await layer.new_channel()
    await layer.group_add("short-lived", channel)
    await layer.group_send("short-lived", {"type": "while.member"})
    assert (await recv(layer, channel))["type"] == "while.member"
    await asyncio.sleep(2.1)
    await layer.group_send("short-lived", {"type": "after.expiry"})
    await assert_nothing(layer, channel)


# -- many readers ----------------------------------------------------------------
async def test_normal_channel_shared_by_two_layer_instances(make_layer, layer_kind):
    first, second = make_layer(capacity=500, separate=True), make_layer(capacity=500, separate=True)
    sender = make_layer(capacity=500)
    assert separate_connections(layer_kind, first, second)
    total = 100
    got: dict[str, list[int]] = {"first": [], "second": []}
    done = asyncio.Event()

    async def consume(name: str, layer: Any) -> None:
        while True:
            message = await layer.receive("shared-work")
            got[name].append(message["n"])
            if len(got["first"]) + len(got["second"]) >= total:
                done.set()

    tasks = [asyncio.ensure_future(consume("first", first)), asyncio.ensure_future(consume("second", second))]
    try:
        await asyncio.sleep(0.1)  # both are waiting before the first send
        for n in range(total):
            await sender.send("shared-work", {"type": "work", "n": n})
        await asyncio.wait_for(done.wait(), 15)
        await asyncio.sleep(QUIET)  # a duplicate would show up now
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    counts = collections.Counter(got["first"] + got["second"])
    missing = sorted(set(range(total)) - set(counts))
    duplicated = sum(c - 1 for c in counts.values())
    assert not missing, f"missing {missing[:10]} ({len(missing)})"
    assert set(counts) == set(range(total))
    if layer_kind == "redis":
        # Deviation (row 5): the readers share one "$inflight" backup key, and
        # each receive first pushes it back onto the channel: a message the
        # other reader has just popped can be delivered again (rare in one
        # process, timing dependent). No loss.
        print(f"redis: {duplicated} duplicate deliveries between two instances")
        return
    assert duplicated == 0, counts.most_common(3)
    # each reader sees its share in order
    assert got["first"] == sorted(got["first"]) and got["second"] == sorted(got["second"])


CONSUMER = r"""
import asyncio, json, sys
kind, connection, channel, index = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]

async def main():
    if kind == "dmb":
        from django_message_broker.layer import ChannelsServerLayer as Layer
    else:
        from channels_redis.core import RedisChannelLayer as Layer
    layer = Layer(capacity=1000, **connection)
    await layer.receive("hello-" + index)  # connected and served
    print("ready", flush=True)
    while True:
        message = await layer.receive(channel)
        print(message["n"], flush=True)

asyncio.run(main())
"""


async def test_normal_channel_shared_by_two_processes(make_layer, layer_kind, layer_config):
    sender = make_layer(capacity=1000)
    total = 200
    channel = unique("procwork")
    processes = []
    counts: collections.Counter[int] = collections.Counter()
    per_process = [0, 0]
    try:
        for index in range(2):
            await sender.send(f"hello-{index}", {"type": "hello"})
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    CONSUMER,
                    layer_kind,
                    json.dumps(layer_config),
                    channel,
                    str(index),
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for process in processes:
            assert (await asyncio.wait_for(process.stdout.readline(), 20)).strip() == b"ready"

        async def collect(index: int, process: Any) -> None:
            while True:
                line = await process.stdout.readline()
                if not line:
                    return
                counts[int(line)] += 1
                per_process[index] += 1

        readers = [asyncio.ensure_future(collect(i, p)) for i, p in enumerate(processes)]
        for n in range(total):
            await sender.send(channel, {"type": "work", "n": n})
        deadline = time.monotonic() + 20
        while len(counts) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(QUIET)  # late duplicates
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
            await process.wait()
    assert set(counts) == set(range(total)), f"missing: {sorted(set(range(total)) - set(counts))[:10]}"
    duplicated = sum(c - 1 for c in counts.values())
    print(f"{layer_kind}: {duplicated} duplicate deliveries, per process {per_process}")
    if layer_kind == "dmb":
        assert duplicated == 0, counts.most_common(3)
    # Deviation: channels_redis shares one "$inflight" backup key per channel
    # between all readers, and every receive first pushes that backup back
    # onto the channel, so a message another process has just popped can be
    # delivered again: duplicates are possible (timing dependent), loss is not.
    assert all(per_process), f"one process got everything: {per_process}"


@pytest.mark.parametrize("channel_kind", ["normal", "process"])
async def test_cancelled_receive_loses_nothing(make_layer, layer_kind, channel_kind):
    receiver, sender = make_layer(capacity=1000), make_layer(capacity=1000)
    channel = unique("cancel") if channel_kind == "normal" else await receiver.new_channel()
    total = 150
    rng = random.Random(4321)
    received: list[int] = []
    cancelled = wrong_exception = 0

    async def send_all() -> None:
        for n in range(total):
            await sender.send(channel, {"type": "n", "n": n})
            # paced, so that most receives are waiting when they are cancelled
            await asyncio.sleep(rng.choice([0, 0.0005, 0.001, 0.002, 0.004]))

    sending = asyncio.ensure_future(send_all())
    attempt = 0
    while not sending.done() or attempt < 200:
        attempt += 1
        task = asyncio.ensure_future(receiver.receive(channel))
        point = attempt % 6  # cancel at many different points
        if point == 0:
            pass  # before the receive even started
        elif point < 4:
            for _ in range(point):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(rng.choice([0.0002, 0.001, 0.003]))
        task.cancel()
        try:
            received.append((await task)["n"])
        except asyncio.CancelledError:
            cancelled += 1
        except Exception as exc:
            if not redis_cancellation_error(layer_kind, exc):
                raise
            cancelled += 1
            wrong_exception += 1
    await sending
    deadline = time.monotonic() + 15
    while len(received) < total and time.monotonic() < deadline:
        message = await receive_or_none(receiver, channel, 1.5)
        if message is None:
            break
        received.append(message["n"])
    if len(received) >= total:
        await assert_nothing(receiver, channel)
    assert cancelled >= 40, cancelled  # the test really cancelled receives
    duplicates = [n for n, c in collections.Counter(received).items() if c > 1]
    missing = sorted(set(range(total)) - set(received))
    print(
        f"{layer_kind}/{channel_kind}: {cancelled} receives cancelled, {len(missing)} messages lost, "
        f"{wrong_exception} cancellations raised a redis error"
    )
    if layer_kind == "redis":
        # Deviation: channels_redis loses a message popped by a BZPOPMIN whose
        # receive was cancelled before the message reached its $inflight backup
        # (and, for process channels, drops the local receive buffer of a
        # cancelled receive, channels_redis #366/#348). Loss is timing
        # dependent; duplicates and invented messages are not allowed.
        assert not duplicates, duplicates
        assert set(received) <= set(range(total))
    else:
        assert not missing and not duplicates, f"missing {missing[:10]} ({len(missing)}), duplicated {duplicates[:10]}"


async def test_cancelled_receives_keep_fifo_order(make_layer, layer_kind):
    """One writer and one reader per channel, the reader cancelling most of
    its receives: what is received arrives in the order it was sent.

    The race this looks for (a delivery handed to a receive at the moment it
    is cancelled, overtaken by the next receive) needs many tries to show, so
    eight channels run at once, for up to four rounds."""
    receiver, sender = make_layer(capacity=1000), make_layer(capacity=1000)
    per_channel = 150

    async def one_channel(channel: str, seed: int) -> list[int]:
        rng = random.Random(seed)
        received: list[int] = []

        async def send_all() -> None:
            for n in range(per_channel):
                await sender.send(channel, {"type": "n", "n": n})
                await asyncio.sleep(rng.choice([0, 0.0005, 0.001, 0.002, 0.004]))

        sending = asyncio.ensure_future(send_all())
        attempt = 0
        while not sending.done():
            attempt += 1
            task = asyncio.ensure_future(receiver.receive(channel))
            point = attempt % 5
            if point < 3:
                for _ in range(point + 1):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(rng.choice([0.0002, 0.001, 0.003]))
            task.cancel()
            try:
                received.append((await task)["n"])
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                if not redis_cancellation_error(layer_kind, exc):
                    raise
        await sending
        while len(received) < per_channel:
            message = await receive_or_none(receiver, channel, 1.0)
            if message is None:
                break  # channels_redis can lose messages (see above)
            received.append(message["n"])
        return received

    inversions: list[tuple[str, int, int]] = []
    # channels_redis is slow at this (every cancelled BZPOPMIN costs it a
    # connection), and already fails the first round: one round is enough.
    rounds = 8 if layer_kind == "dmb" else 1
    for round_ in range(rounds):
        results = await asyncio.gather(*[one_channel(unique(f"order{i}"), round_ * 100 + i) for i in range(8)])
        for i, received in enumerate(results):
            assert len(set(received)) == len(received), f"duplicates on channel {i}"
            inversions += [(f"round {round_} channel {i}", a, b) for a, b in itertools.pairwise(received) if b < a]
        if inversions:
            break
    print(f"{layer_kind}: {len(inversions)} out-of-order deliveries in {round_ + 1} round(s)")
    if layer_kind == "redis":
        # Deviation: channels_redis does not keep FIFO order for a reader whose
        # receives are cancelled (a cancelled BZPOPMIN's message goes back to
        # the channel later, behind newer ones). Not asserted: it is timing
        # dependent. See docs/channels-redis-deviations.md.
        return
    assert not inversions, f"{len(inversions)} out-of-order deliveries, e.g. {inversions[:5]}"


def test_repeated_async_to_sync_group_send(make_layer, layer_kind):
    sender, receiver = make_layer(capacity=500), make_layer(capacity=500)
    total, warmup = 200, 10
    got: list[int] = []
    ready = threading.Event()
    failure: list[BaseException] = []

    def run_receiver() -> None:
        async def main() -> None:
            channel = await receiver.new_channel()
            await receiver.group_add("a2s", channel)
            ready.set()
            while len(got) < total + warmup:
                got.append((await asyncio.wait_for(receiver.receive(channel), 10))["n"])

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run_receiver, daemon=True)
    thread.start()
    assert ready.wait(10)
    group_send = async_to_sync(sender.group_send)
    for n in range(warmup):
        group_send("a2s", {"type": "n", "n": n})
    process = psutil.Process()
    fds, threads = process.num_fds(), process.num_threads()
    for n in range(warmup, warmup + total):
        group_send("a2s", {"type": "n", "n": n})
    thread.join(20)
    assert not failure, failure
    assert got == list(range(total + warmup))
    if layer_kind == "redis":
        # channels_redis keeps a connection pool per event loop; it closes and
        # drops a loop's pool when that loop is closed (it wraps loop.close),
        # which is what saves async_to_sync's one-loop-per-call from leaking.
        assert len(sender._layers) <= 1, len(sender._layers)
    # 200 calls, each on a new event loop, leave no connections or threads behind
    assert process.num_fds() - fds <= 4, (fds, process.num_fds())
    assert process.num_threads() - threads <= 2, (threads, process.num_threads())


# -- flush, extensions, misc -----------------------------------------------------
async def test_flush_empties_channels_and_groups(make_layer):
    layer, other = make_layer(), make_layer()
    member = await other.new_channel()
    await other.group_add("flushed", member)
    await other.group_add("flushed", "flushed-normal")
    for n in range(3):
        await layer.send("flush-me", {"type": "n", "n": n})
    await layer.send(member, {"type": "direct"})
    # one message was read: the other two are still on the layer
    assert (await recv(layer, "flush-me"))["n"] == 0
    await layer.flush()
    await assert_nothing(layer, "flush-me", 1.5)
    await assert_nothing(other, member)
    await other.group_send("flushed", {"type": "after.flush"})
    await assert_nothing(other, member)
    await assert_nothing(other, "flushed-normal")
    # still usable after a flush
    await layer.send("flush-me", {"type": "fresh"})
    assert (await recv(layer, "flush-me"))["type"] == "fresh"


async def _sends_surviving_a_flush(sender: Any, flusher: Any, rounds: int = 20) -> list[int]:
    """Send one message, flush from ``flusher``, see whether it survived."""
    survived = []
    for n in range(rounds):
        channel = unique(f"flush-race-{n}")
        await sender.send(channel, {"type": "n", "n": n})
        await flusher.flush()
        message = await receive_or_none(flusher, channel, 0.1)
        if message is not None:
            survived.append(message["n"])
    return survived


async def test_flush_from_another_instance_removes_completed_sends(make_layer, layer_kind):
    """Once ``await send()`` has returned, a ``flush()`` from another layer
    instance removes the message.

    channels_redis: on any connection (every send is a round trip).
    Ours (deviation 9 in docs/channels-redis-deviations.md): a send far below
    capacity is pipelined and returns before the broker has the message, so
    the guarantee is for what the broker has accepted: instances in one
    process share a connection, which keeps order (no message survives);
    across connections, a send that waited for the broker's answer (here:
    capacity 1, so every send is checked) never survives either."""
    if layer_kind == "redis":
        sender, flusher = make_layer(separate=True), make_layer(separate=True)
        assert separate_connections(layer_kind, sender, flusher)
        survived = await _sends_surviving_a_flush(sender, flusher)
        assert not survived, f"{len(survived)} of 20 completed sends survived a later flush: {survived}"
        return
    sender, flusher = make_layer(), make_layer()
    assert not separate_connections(layer_kind, sender, flusher)  # one process, one connection
    survived = await _sends_surviving_a_flush(sender, flusher)
    assert not survived, f"same connection: {len(survived)} of 20 completed sends survived a flush: {survived}"
    sender, flusher = make_layer(separate=True, capacity=1), make_layer(separate=True, capacity=1)
    assert separate_connections(layer_kind, sender, flusher)
    survived = await _sends_surviving_a_flush(sender, flusher)
    assert not survived, (
        f"acknowledged sends: {len(survived)} of 20 survived a flush from another connection: {survived}"
    )


def test_extensions(layer):
    assert "groups" in layer.extensions
    assert "flush" in layer.extensions


async def test_receive_on_empty_channel_does_not_return(layer, layer_kind):
    for channel in ("nothing-here", await layer.new_channel()):
        with pytest.raises(Exception) as raised:
            message = await asyncio.wait_for(layer.receive(channel), 0.5)
            pytest.fail(f"receive returned {message!r}")
        # asyncio's TimeoutError; redis-py may turn it into its own (row 3)
        assert raised.type is asyncio.TimeoutError or redis_cancellation_error(layer_kind, raised.value), raised.value
    # and a timed-out receive leaves the channel usable
    await layer.send("nothing-here", {"type": "late"})
    assert (await recv(layer, "nothing-here"))["type"] == "late"


async def test_one_megabyte_message_round_trips(make_layer):
    # 1 MiB means 1 MiB: a payload of exactly 1,048,576 bytes plus other keys,
    # with the default config (issue #10)
    sender, receiver = make_layer(), make_layer()
    payload = bytes(range(256)) * 4096
    assert len(payload) == 1_048_576
    await sender.send("big", {"type": "big", "payload": payload, "id": 1})
    channel = await receiver.new_channel()
    await receiver.group_add("biggroup", channel)
    await sender.group_send("biggroup", {"type": "big.group", "payload": payload, "id": 2})
    message = await recv(receiver, "big", 10)
    assert message == {"type": "big", "payload": payload, "id": 1}
    message = await recv(receiver, channel, 10)
    assert message == {"type": "big.group", "payload": payload, "id": 2}


async def test_oversized_message(make_layer, layer_kind):
    # Bigger than our default limit (16 MiB, the largest websocket frame
    # uvicorn takes), with the default config. Deviations doc, row 2.
    layer = make_layer()
    text = "y" * (16 << 20)  # 16 MiB of text: over 16 MiB encoded
    channel = await layer.new_channel()
    await layer.group_add("oversized", channel)
    if layer_kind == "dmb":
        with pytest.raises(MessageTooLarge):
            await layer.send("oversized", {"type": "huge", "text": text})
        with pytest.raises(MessageTooLarge):
            await layer.group_send("oversized", {"type": "huge", "text": text})
        await assert_nothing(layer, "oversized")
        await assert_nothing(layer, channel)
        # the connection is still fine afterwards
        await layer.send("oversized", {"type": "small"})
        assert (await recv(layer, "oversized"))["type"] == "small"
    else:
        # channels_redis has no size limit of its own (Redis allows 512 MB)
        await layer.send("oversized", {"type": "huge", "text": text})
        await layer.group_send("oversized", {"type": "huge", "text": text})
        assert (await recv(layer, "oversized", 10))["text"] == text
        assert (await recv(layer, channel, 10))["text"] == text
