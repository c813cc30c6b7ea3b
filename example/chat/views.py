from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from chat.rooms import ROOM_PATTERN, SUGGESTED_ROOMS


def _servers(request: HttpRequest, path: str) -> list[dict[str, object]]:
    """The same page on each of the demo's web servers."""
    here = request.build_absolute_uri("/").rstrip("/")
    servers = [base.rstrip("/") for base in settings.DEMO_SERVERS]
    return [{"url": base + path, "label": base.split("//", 1)[-1], "current": base == here} for base in servers]


def lobby(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "chat/lobby.html",
        {"rooms": SUGGESTED_ROOMS, "room_pattern": ROOM_PATTERN, "servers": _servers(request, "/")},
    )


def room(request: HttpRequest, name: str) -> HttpResponse:
    return render(request, "chat/room.html", {"room": name, "servers": _servers(request, request.path)})
