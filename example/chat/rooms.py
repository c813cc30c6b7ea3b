"""Room names: also part of a Channels group name, so keep to its rules
(ASCII letters, digits, ``-``, ``_``, ``.``; the group name under 100 chars)."""

from __future__ import annotations

ROOM_PATTERN = r"[A-Za-z0-9_.-]{1,80}"
SUGGESTED_ROOMS = ["lobby", "general", "random"]


def group_name(room: str) -> str:
    return f"room-{room}"
