"""``manage.py brokerkeys NAME``: create a CURVE key pair (``NAME.key``,
``NAME.key_secret``) for the broker or for a client. See docs/security.md."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ...keys import create_keypair


class Command(BaseCommand):
    help = "Create a CURVE key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name", help="file name stem, e.g. broker or web-1")
        parser.add_argument("--dir", "-d", default=".", help="output directory (default: the current one)")
        parser.add_argument("--force", action="store_true", help="overwrite existing files")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            public, secret = create_keypair(options["name"], options["dir"], force=options["force"])
        except (OSError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"public key: {public}\nsecret key: {secret} (keep it private)")
