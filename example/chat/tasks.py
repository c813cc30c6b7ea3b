"""The demo's Celery task: ``/report`` in a room runs it on the Celery
worker, which posts its answer back to the room through the channel layer."""

from __future__ import annotations

import os
import socket
import time

from asgiref.sync import async_to_sync
from celery import shared_task
from channels.layers import get_channel_layer

from chat.rooms import group_name


@shared_task
def report(room: str, user: str, asked_at: float) -> None:
    """Post a short report to ``room``: who asked, which worker answered,
    and how long the round trip through the broker took so far."""
    took_ms = (time.time() - asked_at) * 1000
    text = f"report for {user}: task ran on {socket.gethostname()} pid {os.getpid()}, {took_ms:.1f} ms after /report"
    layer = get_channel_layer()
    assert layer is not None
    async_to_sync(layer.group_send)(group_name(room), {"type": "chat.message", "text": text, "user": "celery"})
