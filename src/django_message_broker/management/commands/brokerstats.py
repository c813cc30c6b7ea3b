"""``manage.py brokerstats``: the broker's stats, as ``python -m
django_message_broker stats`` shows them (the same options), with the
address and CURVE keys of the project's ``CHANNEL_LAYERS`` entry by
default (``--alias``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ...__main__ import add_stats_arguments
from ...options import LayerOptions
from ...stats_view import run


class Command(BaseCommand):
    help = "Show the django-message-broker broker's stats: channels, clients, rates (top-like, or JSON)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--address", default=None, help="the broker's address (default: the layer's, from CHANNEL_LAYERS)"
        )
        parser.add_argument(
            "--alias", default="default", help="CHANNEL_LAYERS alias to read the address from (default: default)"
        )
        add_stats_arguments(parser)
        parser.add_argument(
            "--server-key", default=None, help="CURVE: the broker's public certificate (default: CONFIG's server_key)"
        )
        parser.add_argument(
            "--client-key", default=None, help="CURVE: this client's secret certificate (default: CONFIG's client_key)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        config = (getattr(settings, "CHANNEL_LAYERS", {}) or {}).get(options["alias"], {}).get("CONFIG", {})
        try:
            client = LayerOptions.from_config(config or {}).client
        except (TypeError, ValueError) as exc:
            raise CommandError(f"CHANNEL_LAYERS[{options['alias']!r}]: {exc}") from None
        address = options["address"] or client.address
        status = run(
            address,
            watch=options["watch"],
            as_json=options["json"],
            top=options["top"],
            count=options["count"],
            timeout=options["timeout"],
            server_key=options["server_key"] or client.server_key,
            client_key=options["client_key"] or client.client_key,
            out=self.stdout._out,
            err=self.stderr._out,
        )
        if status:
            raise CommandError(f"no stats from the broker at {address}", returncode=status)
