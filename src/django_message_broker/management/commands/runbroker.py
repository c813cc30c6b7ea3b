"""``manage.py runbroker``: run the broker in the foreground (for production,
under a process manager such as systemd)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ...layer import layer_options
from ...server.broker import DEFAULT_MAX_BODY
from ...server.server import serve


class Command(BaseCommand):
    help = "Run the django-message-broker broker in the foreground."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bind", default=None, help="address to bind (default: the layer's configured address)")
        parser.add_argument("--alias", default="default", help="CHANNEL_LAYERS alias to read the address from")
        parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY)
        parser.add_argument("--idle-timeout", type=float, default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        address = options["bind"]
        if address is None:
            config = (getattr(settings, "CHANNEL_LAYERS", {}) or {}).get(options["alias"], {}).get("CONFIG", {})
            address = layer_options(config or {})["address"]
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            asyncio.run(serve(address, max_body=options["max_body"], idle_timeout=options["idle_timeout"]))
        except (OSError, zmq.ZMQError) as exc:
            raise CommandError(f"cannot serve on {address}: {exc}") from None
