"""System checks: warn about risky broker configurations."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from .embedded import is_local_address

BACKEND = "django_message_broker.ChannelsServerLayer"
_BACKENDS = {BACKEND, "django_message_broker.layer.ChannelsServerLayer"}


@checks.register("django_message_broker")
def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .layer import layer_options

    messages: list[checks.CheckMessage] = []
    for alias, layer in (getattr(settings, "CHANNEL_LAYERS", None) or {}).items():
        if layer.get("BACKEND") not in _BACKENDS:
            continue
        config = layer.get("CONFIG", {}) or {}
        try:
            options = layer_options(config)
        except (TypeError, ValueError) as exc:
            messages.append(
                checks.Error(f"CHANNEL_LAYERS[{alias!r}]: bad CONFIG: {exc}", id="django_message_broker.E001")
            )
            continue
        address = options["address"]
        if not is_local_address(address):
            messages.append(
                checks.Warning(
                    f"CHANNEL_LAYERS[{alias!r}] uses broker address {address}, which is not on loopback.",
                    hint="The broker has no authentication or encryption: keep it on 127.0.0.1 or ipc://, "
                    "or behind a firewall.",
                    id="django_message_broker.W001",
                )
            )
            if config.get("embedded"):
                messages.append(
                    checks.Error(
                        f"CHANNEL_LAYERS[{alias!r}]: embedded=True needs a local address, not {address}.",
                        id="django_message_broker.E002",
                    )
                )
        capacity = config.get("capacity", 100)
        if not isinstance(capacity, int) or capacity < 1:
            messages.append(
                checks.Error(
                    f"CHANNEL_LAYERS[{alias!r}]: capacity must be a positive int.", id="django_message_broker.E003"
                )
            )
    return messages
