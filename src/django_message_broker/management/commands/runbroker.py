"""``manage.py runbroker``: run the broker in the foreground (for production,
under a process manager such as systemd)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ...options import LayerOptions
from ...server.server import serve


class Command(BaseCommand):
    help = "Run the django-message-broker broker in the foreground."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bind", default=None, help="address to bind (default: the layer's configured address)")
        parser.add_argument("--alias", default="default", help="CHANNEL_LAYERS alias to read the address from")
        parser.add_argument(
            "--max-body", type=int, default=None, help="largest message in bytes (default: CONFIG's max_message_size)"
        )
        parser.add_argument("--idle-timeout", type=float, default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        config = (getattr(settings, "CHANNEL_LAYERS", {}) or {}).get(options["alias"], {}).get("CONFIG", {})
        try:
            client = LayerOptions.from_config(config or {}).client
        except (TypeError, ValueError) as exc:
            raise CommandError(f"CHANNEL_LAYERS[{options['alias']!r}]: {exc}") from None
        address = options["bind"] or client.address
        max_body = options["max_body"] or client.max_message_size
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            asyncio.run(serve(address, max_body=max_body, idle_timeout=options["idle_timeout"]))
        except (OSError, zmq.ZMQError) as exc:
            raise CommandError(f"cannot serve on {address}: {exc}") from None
