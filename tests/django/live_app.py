"""The ASGI application ``live_tests`` serves from Daphne: one websocket
consumer that joins the group "live", says "ready", and forwards every
``live.message`` sent to the group."""

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path

GROUP = "live"


class LiveConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        # the first use of the layer in the forked Daphne process
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        await self.send(text_data="ready")

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def live_message(self, event: dict) -> None:
        await self.send(text_data=event["text"])


application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/live/", LiveConsumer.as_asgi())])})
