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
        "data_dir": "/var/lib/dmb",              # durable task queues (docs/durability.md)
        "fsync": "always",                       # or "everysec", "off"
    }

See docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
from typing import Any

import zmq
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ...__main__ import LOG_LEVELS, add_metrics_arguments
from ..._memory import parse_size
from ...embedded import address_in_use_hint
from ...metrics import MetricsError, require_prometheus
from ...options import LayerOptions
from ...server.server import check_bind, serve
from ...server.store import FSYNC_MODES

SERVER_SETTINGS = {"bind", "secret_key", "authorized_keys", "ipc_mode", "insecure", "data_dir", "fsync"}


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
        # The same options as ``python -m django_message_broker serve`` (a
        # test holds them equal), read from settings where settings have them.
        parser.add_argument(
            "--bind",
            default=None,
            help="address to bind (default: MESSAGE_BROKER_SERVER's bind, else the layer's address)",
        )
        parser.add_argument(
            "--alias", default="default", help="CHANNEL_LAYERS alias to read the address from (default: default)"
        )
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
        parser.add_argument(
            "--max-queue-length", type=int, default=None, help="hard cap on any one channel's queue (default: none)"
        )
        parser.add_argument(
            "--idle-timeout",
            type=float,
            default=None,
            help="exit after this many idle seconds (no clients, nothing queued; default: never)",
        )
        parser.add_argument(
            "--secret-key", default=None, help="the broker's secret certificate: encrypt with CURVE (docs/security.md)"
        )
        parser.add_argument(
            "--authorized-keys",
            default=None,
            help="directory of the clients' public certificates: only they may connect (re-read on SIGHUP)",
        )
        parser.add_argument(
            "--insecure",
            action="store_true",
            default=None,
            help="allow a non-loopback TCP address without a secret key (plain text, anyone may connect)",
        )
        parser.add_argument("--ipc-mode", type=_octal, default=None, help="file mode of an ipc:// socket, e.g. 0660")
        parser.add_argument(
            "--data-dir",
            default=None,
            help="keep durable task queues (Celery's) in this directory, so they survive a restart "
            "(default: MESSAGE_BROKER_SERVER's data_dir, else in memory only)",
        )
        parser.add_argument(
            "--fsync",
            default=None,
            choices=FSYNC_MODES,
            help="with --data-dir: always (the default), everysec or off",
        )
        parser.add_argument(
            "--log-level",
            default=None,
            type=str.upper,
            choices=LOG_LEVELS,
            metavar="LEVEL",
            help=f"log the broker's messages of this level and above: {', '.join(LOG_LEVELS)} (default INFO, "
            "unless settings.LOGGING says otherwise)",
        )
        add_metrics_arguments(parser)

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
        metrics: dict[str, Any] = {}
        if options["metrics_port"] is not None:
            try:
                require_prometheus()
            except MetricsError as exc:
                raise CommandError(str(exc)) from None
            metrics = {"metrics_port": options["metrics_port"], "metrics_host": options["metrics_host"]}
        level = options["log_level"]
        if not logging.getLogger().handlers:
            logging.basicConfig(level=level or logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if level:
            logging.getLogger("django_message_broker").setLevel(level)
        try:
            asyncio.run(
                serve(
                    address,
                    max_body=max_body,
                    max_queue_length=options["max_queue_length"],
                    max_memory=max_memory,
                    idle_timeout=options["idle_timeout"],
                    data_dir=options["data_dir"] or conf.get("data_dir"),
                    fsync=options["fsync"] or conf.get("fsync") or "always",
                    **metrics,
                    **security,
                )
            )
        except ValueError as exc:
            raise CommandError(f"refusing to serve on {address}: {exc}") from None
        except MetricsError as exc:
            raise CommandError(str(exc)) from None
        except (OSError, zmq.ZMQError) as exc:
            message = f"cannot serve on {address}: {exc}"
            if exc.errno == errno.EADDRINUSE:
                message += f"\n{address_in_use_hint(address)}"
            raise CommandError(message) from None
