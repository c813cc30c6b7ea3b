"""The layer from Django settings, ProcessClient, and consumers, in process
(the broker is the ``broker`` fixture's, on a free port)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.exceptions import ChannelFull
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from dmb_helpers import port_of

from django_message_broker import ProcessClient
from django_message_broker.layer import ChannelsServerLayer


async def recv(layer: Any, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


# -- get_channel_layer() ------------------------------------------------------------
async def test_get_channel_layer_builds_our_layer_from_settings(use_layers, broker):
    await use_layers(capacity=7, expiry=30, group_expiry=120, channel_capacity={"small-*": 2})
    layer = get_channel_layer()
    assert isinstance(layer, ChannelsServerLayer)
    assert layer is get_channel_layer()  # one instance per process
    assert layer.address == broker.address
    assert layer.options.embedded is False
    assert (layer.capacity, layer.expiry, layer.group_expiry) == (7, 30, 120)
    assert layer.get_capacity("small-one") == 2 and layer.get_capacity("other") == 7
    await layer.send("settings-test", {"type": "hello"})
    assert await recv(layer, "settings-test") == {"type": "hello"}
    await layer.send("small-one", {"type": "n"})
    await layer.send("small-one", {"type": "n"})
    with pytest.raises(ChannelFull):
        await layer.send("small-one", {"type": "n"})


async def test_get_channel_layer_accepts_predecessor_ip_address_and_port(use_layers, broker):
    port = port_of(broker.address)
    await use_layers(ip_address="127.0.0.1", port=port, aliases={"explicit": {"address": broker.address, "port": 1}})
    layer = get_channel_layer()
    assert layer.address == f"tcp://127.0.0.1:{port}"
    await layer.send("predecessor", {"type": "spelling"})
    assert await recv(layer, "predecessor") == {"type": "spelling"}
    # "address" wins over ip_address/port when both are given
    assert get_channel_layer("explicit").address == broker.address


async def test_get_channel_layer_rejects_unknown_options(use_layers):
    await use_layers(adress="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="did you mean 'address'"):
        get_channel_layer()


async def test_get_channel_layer_rejects_a_wrongly_typed_expiry(use_layers):
    # the report: expiry="60" made every send return while the broker dropped the message
    await use_layers(expiry="60")
    with pytest.raises(TypeError, match="'expiry' must be a number"):
        get_channel_layer()


async def test_max_message_size_is_the_layers_limit(broker):
    from channels.exceptions import MessageTooLarge as ChannelsMessageTooLarge

    from django_message_broker.exceptions import MessageTooLarge

    layer = ChannelsServerLayer(address=broker.address, embedded=False, max_message_size=1000)
    try:
        message = {"type": "big", "text": "x" * 1000}  # over 1000 bytes encoded
        for call in (layer.send("limited", message), layer.group_send("limited-group", message)):
            with pytest.raises(ChannelsMessageTooLarge) as raised:
                await call
            assert isinstance(raised.value, MessageTooLarge) and raised.value.limit == 1000
        await layer.send("limited", {"type": "small", "text": "x" * 900})
        assert (await recv(layer, "limited"))["type"] == "small"
    finally:
        await layer.close()


# -- ProcessClient -----------------------------------------------------------------
async def test_process_client_reads_config_from_settings(use_layers, broker):
    port = port_of(broker.address)
    workers = {"ip_address": "127.0.0.1", "port": port}
    await use_layers(capacity=2, expiry=30, group_expiry=90, aliases={"workers": workers})
    layer = get_channel_layer()
    with ProcessClient() as client:
        assert client.options.address == broker.address
        assert client.options.embedded is False
        assert (client.capacity, client.expiry, client.group_expiry) == (2, 30.0, 90.0)
        client.send("pc-config", {"type": "one"})
        client.send("pc-config", {"type": "two"})
        with pytest.raises(ChannelFull):
            client.send("pc-config", {"type": "three"})
    assert [(await recv(layer, "pc-config"))["type"] for _ in range(2)] == ["one", "two"]
    with ProcessClient(alias="workers") as client:
        assert client.options.address == f"tcp://127.0.0.1:{port}"
        client.send("pc-alias", {"type": "via.alias"})
    assert (await recv(layer, "pc-alias"))["type"] == "via.alias"


async def test_process_client_sync_methods_interoperate_with_layer(use_layers):
    await use_layers()
    layer = get_channel_layer()
    member = await layer.new_channel()
    await layer.group_add("pc-room", member)
    with ProcessClient() as client:
        # worker -> layer: a group and a plain channel
        message = {"type": "chat.message", "text": "hi"}
        delivered, skipped = await asyncio.to_thread(client.group_send, "pc-room", message)
        assert (delivered, skipped) == (1, 0)
        assert await recv(layer, member) == {"type": "chat.message", "text": "hi"}
        await asyncio.to_thread(client.send, "pc-plain", {"type": "plain"})
        assert await recv(layer, "pc-plain") == {"type": "plain"}
        # layer -> worker: a plain channel and a group the worker joined
        await layer.send("to-worker", {"type": "job", "n": 1})
        assert await asyncio.to_thread(client.receive, "to-worker", 5) == {"type": "job", "n": 1}
        worker_channel = client.new_channel()
        await asyncio.to_thread(client.group_add, "pc-room", worker_channel)
        await layer.group_send("pc-room", {"type": "both"})
        assert (await recv(layer, member))["type"] == "both"
        assert (await asyncio.to_thread(client.receive, worker_channel, 5))["type"] == "both"
        await asyncio.to_thread(client.group_discard, "pc-room", worker_channel)
        await layer.group_send("pc-room", {"type": "layer.only"})
        assert (await recv(layer, member))["type"] == "layer.only"
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(client.receive, worker_channel, 0.3)
        # bad names are TypeError, as in the layer
        with pytest.raises(TypeError):
            client.send("bad name", {"type": "x"})
        with pytest.raises(TypeError):
            client.send("fine", ["not", "a", "dict"])
        # flush empties what the layer sees (sent on the client's own
        # connection: the cross-connection case is in tests/conformance)
        await asyncio.to_thread(client.send, "pc-flush", {"type": "stale"})
        await asyncio.to_thread(client.flush)
        with pytest.raises(asyncio.TimeoutError):
            await recv(layer, "pc-flush", 0.3)


async def test_process_client_async_methods_interoperate_with_layer(use_layers):
    await use_layers()
    layer = get_channel_layer()
    member = await layer.new_channel()
    await layer.group_add("apc-room", member)
    with ProcessClient() as client:
        delivered, skipped = await client.agroup_send("apc-room", {"type": "chat.message", "text": "async hi"})
        assert (delivered, skipped) == (1, 0)
        assert await recv(layer, member) == {"type": "chat.message", "text": "async hi"}
        await client.asend("apc-plain", {"type": "plain"})
        assert await recv(layer, "apc-plain") == {"type": "plain"}
        await layer.send("to-async-worker", {"type": "job"})
        assert await asyncio.wait_for(client.areceive("to-async-worker"), 5) == {"type": "job"}
        worker_channel = client.new_channel()
        await client.agroup_add("apc-room", worker_channel)
        await layer.group_send("apc-room", {"type": "both"})
        assert (await asyncio.wait_for(client.areceive(worker_channel), 5))["type"] == "both"
        assert (await recv(layer, member))["type"] == "both"
        await client.agroup_discard("apc-room", worker_channel)
        await layer.group_send("apc-room", {"type": "layer.only"})
        assert (await recv(layer, member))["type"] == "layer.only"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.areceive(worker_channel), 0.3)
        await client.asend("apc-flush", {"type": "stale"})
        await client.aflush()
        with pytest.raises(asyncio.TimeoutError):
            await recv(layer, "apc-flush", 0.3)


# -- a consumer ----------------------------------------------------------------------
class ChatConsumer(AsyncJsonWebsocketConsumer):
    groups = ["chat-lobby"]  # joined on connect, left on disconnect (by Channels)

    async def connect(self) -> None:
        await self.accept()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        await self.channel_layer.group_send("chat-lobby", {"type": "chat.message", "text": content["text"]})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"]})


def websocket_scope(path: str = "/ws/chat/") -> dict[str, Any]:
    return {"type": "websocket", "path": path, "headers": [], "query_string": b"", "subprotocols": []}


async def connect(app: Any) -> ApplicationCommunicator:
    communicator = ApplicationCommunicator(app, websocket_scope())
    await communicator.send_input({"type": "websocket.connect"})
    assert (await communicator.receive_output(5))["type"] == "websocket.accept"
    return communicator


async def next_text(communicator: ApplicationCommunicator) -> str:
    message = await communicator.receive_output(5)
    assert message["type"] == "websocket.send", message
    return json.loads(message["text"])["text"]


async def test_consumer_group_send_through_our_layer(use_layers):
    # channels.testing.WebsocketCommunicator needs daphne (not installed):
    # asgiref's ApplicationCommunicator drives the consumer the same way.
    await use_layers()
    app = ChatConsumer.as_asgi()
    alice, bob = await connect(app), await connect(app)
    layer = get_channel_layer()
    try:
        # from outside (a view, say)
        await layer.group_send("chat-lobby", {"type": "chat.message", "text": "welcome"})
        assert await next_text(alice) == "welcome"
        assert await next_text(bob) == "welcome"
        # from a consumer
        await alice.send_input({"type": "websocket.receive", "text": json.dumps({"text": "hi bob"})})
        assert await next_text(alice) == "hi bob"
        assert await next_text(bob) == "hi bob"
        # from a worker process's client
        with ProcessClient() as client:
            await client.agroup_send("chat-lobby", {"type": "chat.message", "text": "from a worker"})
        assert await next_text(alice) == "from a worker"
        assert await next_text(bob) == "from a worker"
        # alice leaves the group on disconnect; bob alone gets the next one
        await alice.send_input({"type": "websocket.disconnect", "code": 1000})
        await alice.wait(5)
        await layer.group_send("chat-lobby", {"type": "chat.message", "text": "bob only"})
        assert await next_text(bob) == "bob only"
        assert await alice.receive_nothing(0.3)
    finally:
        await bob.send_input({"type": "websocket.disconnect", "code": 1000})
        await bob.wait(5)
