from __future__ import annotations

from django.urls import path, re_path

from chat import views
from chat.rooms import ROOM_PATTERN

urlpatterns = [
    path("", views.lobby, name="lobby"),
    re_path(rf"^room/(?P<name>{ROOM_PATTERN})/$", views.room, name="room"),
]
