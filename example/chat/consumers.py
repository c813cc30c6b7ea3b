"""One websocket per browser tab; a room is the Channels group ``room-<name>``."""

from __future__ import annotations

import logging
import time
from typing import Any

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat.rooms import group_name

logger = logging.getLogger("chat")

MAX_TEXT = 2000
MAX_USER = 40


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """Joins ``room-<room>`` on connect; what a client sends goes to the whole
    group (on every web server process) as ``{"type": "chat.message", ...}``.
    ``/report`` starts a Celery task instead, which answers in the room."""

    room = ""
    group = ""

    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        self.group = group_name(self.room)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            return
        text = str(content.get("text", "")).strip()[:MAX_TEXT]
        user = str(content.get("user", "")).strip()[:MAX_USER] or "anonymous"
        if not text:
            return
        if text == "/report":  # a Celery task on the same broker answers in the room
            from chat.tasks import report

            await sync_to_async(report.delay)(self.room, user, time.time())
            return
        await self.channel_layer.group_send(self.group, {"type": "chat.message", "text": text, "user": user})

    async def chat_message(self, event: dict[str, Any]) -> None:
        """A group message (from any web server or the background worker)."""
        await self.send_json({"type": "chat.message", "text": event.get("text", ""), "user": event.get("user", "")})
