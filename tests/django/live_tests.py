"""Channels' ``ChannelsLiveServerTestCase`` after the layer was used (issue #8).

The test case forks a Daphne server (``DaphneProcess``, a ``multiprocessing``
child) in ``setUpClass``. Here the test process uses the layer first, so the
child inherits a used client: before the fork fix the consumer's first layer
call hung in the child and every websocket handshake was reset. Each test
opens a websocket to the forked server and sends to it through the layer
from the test process.

Run by ``test_live_server.py`` (Django's test runner, in a subprocess); not
collected by pytest.
"""

import asyncio
import multiprocessing
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import ChannelsLiveServerTestCase

try:
    from websockets.asyncio.client import connect
except ImportError:  # websockets < 13
    from websockets import connect  # type: ignore[no-redef]

from live_app import GROUP

WAIT = 10.0  # seconds for any one step


async def round_trip_before_the_fork() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "before.fork"})
    message = await asyncio.wait_for(layer.receive(channel), WAIT)
    assert message == {"type": "before.fork"}, message


class LiveServerAfterTheLayerWasUsed(ChannelsLiveServerTestCase):
    serve_static = False

    @classmethod
    def setUpClass(cls) -> None:
        # DaphneProcess is a multiprocessing child: make it a fork, as it is
        # by default on Linux before Python 3.14, whatever the default here
        multiprocessing.set_start_method("fork", force=True)
        # the layer's client is up in this process before Daphne is forked
        async_to_sync(round_trip_before_the_fork)()
        super().setUpClass()

    async def websocket_receives_a_group_send(self) -> None:
        text = f"from-the-test-process-{uuid.uuid4().hex[:8]}"
        url = self.live_server_ws_url + "/ws/live/"
        async with connect(url, open_timeout=WAIT) as websocket:
            # "ready" comes after the consumer's group_add in the Daphne child
            self.assertEqual(await asyncio.wait_for(websocket.recv(), WAIT), "ready")
            await get_channel_layer().group_send(GROUP, {"type": "live.message", "text": text})
            self.assertEqual(await asyncio.wait_for(websocket.recv(), WAIT), text)

    async def test_websocket_receives_a_group_send_from_the_test_process(self) -> None:
        await self.websocket_receives_a_group_send()

    async def test_the_same_server_serves_a_second_websocket(self) -> None:
        await self.websocket_receives_a_group_send()
