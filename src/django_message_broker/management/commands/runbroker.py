"""``manage.py runbroker``: run the broker in the foreground (for production,
under a process manager such as systemd).

Security settings come from ``settings.MESSAGE_BROKER_SERVER`` (a dict; the
flags override it)::

    MESSAGE_BROKER_SERVER = {
        "bind": "tcp://10.0.0.1:5556",           # default: the layer's address
        "secret_key": "/etc/dmb/broker.key_secret",
        "authorized_keys": "/etc/dmb/clients",   # re-read on SIGHUP
        "ipc_mode": 0o660,                       # ipc:// socket file mode
        "insecure": False,                       # plain text off loopback
    }

See docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import zmq
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ..._memory import parse_size
from ...options import LayerOptions
from ...server.server import check_bind, serve

SERVER_SETTINGS = {"bind", "secret_key", "authorized_keys", "ipc_mode", "insecure"}


def server_settings() -> dict[str, Any]:
    """``settings.MESSAGE_BROKER_SERVER``, checked (``CommandError``)."""
    value = getattr(settings, "MESSAGE_BROKER_SERVER", None) or {}
    if not isinstance(value, dict):
        raise CommandError("MESSAGE_BROKER_SERVER must be a dict")
    unknown = set(value) - SERVER_SETTINGS
    if unknown:
        raise CommandError(f"unknown MESSAGE_BROKER_SERVER key(s): {', '.join(sorted(unknown))}")
    return dict(value)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _octal(text: str) -> int:
    return int(text, 8)


class Command(BaseCommand):
    help = "Run the django-message-broker broker in the foreground."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bind", default=None, help="address to bind (default: the layer's configured address)")
        parser.add_argument("--alias", default="default", help="CHANNEL_LAYERS alias to read the address from")
        parser.add_argument(
            "--max-body", type=int, default=None, help="largest message in bytes (default: CONFIG's max_message_size)"
        )
        parser.add_argument(
            "--max-memory",
            type=_size,
            default=None,
            help="bytes of queued messages held at most, e.g. 256MB or 1GiB "
            "(default: CONFIG's embedded_max_memory, else a quarter of physical memory)",
        )
        parser.add_argument("--idle-timeout", type=float, default=None)
        parser.add_argument("--secret-key", default=None, help="the broker's secret certificate (CURVE)")
        parser.add_argument("--authorized-keys", default=None, help="directory of clients' public certificates")
        parser.add_argument(
            "--insecure", action="store_true", default=None, help="allow plain text on a non-loopback address"
        )
        parser.add_argument("--ipc-mode", type=_octal, default=None, help="file mode of an ipc:// socket, e.g. 0660")

    def handle(self, *args: Any, **options: Any) -> None:
        conf = server_settings()
        config = (getattr(settings, "CHANNEL_LAYERS", {}) or {}).get(options["alias"], {}).get("CONFIG", {})
        try:
            client = LayerOptions.from_config(config or {}).client
        except (TypeError, ValueError) as exc:
            raise CommandError(f"CHANNEL_LAYERS[{options['alias']!r}]: {exc}") from None
        address = options["bind"] or conf.get("bind") or client.address
        max_body = options["max_body"] or client.max_message_size
        max_memory = options["max_memory"] or client.embedded_max_memory
        security: dict[str, Any] = {
            key: options[key] if options[key] is not None else conf.get(key)
            for key in ("secret_key", "authorized_keys", "ipc_mode", "insecure")
        }
        security["insecure"] = bool(security["insecure"])
        try:
            check_bind(
                address,
                secret_key=security["secret_key"],
                authorized_keys=security["authorized_keys"],
                insecure=security["insecure"],
            )
        except ValueError as exc:
            raise CommandError(f"refusing to serve on {address}: {exc}") from None
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            asyncio.run(
                serve(
                    address, max_body=max_body, max_memory=max_memory, idle_timeout=options["idle_timeout"], **security
                )
            )
        except ValueError as exc:
            raise CommandError(f"refusing to serve on {address}: {exc}") from None
        except (OSError, zmq.ZMQError) as exc:
            raise CommandError(f"cannot serve on {address}: {exc}") from None
