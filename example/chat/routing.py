from __future__ import annotations

from django.urls import re_path

from chat.consumers import ChatConsumer
from chat.rooms import ROOM_PATTERN

websocket_urlpatterns = [
    re_path(rf"^ws/chat/(?P<room>{ROOM_PATTERN})/$", ChatConsumer.as_asgi()),
]
