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
        messages += _check_client_keys(alias, options)
        if not is_local_address(address) and not options["server_key"]:
            messages.append(
                checks.Warning(
                    f"CHANNEL_LAYERS[{alias!r}] uses broker address {address}, which is not on loopback, "
                    "in plain text.",
                    hint="Set server_key and client_key in CONFIG so that the connection is encrypted and "
                    "the broker admits only known clients (docs/security.md); or keep the broker on "
                    "127.0.0.1 or ipc://.",
                    id="django_message_broker.W001",
                )
            )
        if not is_local_address(address) and options["server_key"] and not options["client_key"]:
            messages.append(
                checks.Warning(
                    f"CHANNEL_LAYERS[{alias!r}] has a server_key but no client_key.",
                    hint="Without client_key the connection is encrypted with a throwaway key, which a broker "
                    "with authorized keys refuses (docs/security.md).",
                    id="django_message_broker.W002",
                )
            )
        if not is_local_address(address):
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
    return messages + _check_server_settings()


# --- CURVE (docs/security.md) -----------------------------------------------
def _check_client_keys(alias: str, options: dict[str, Any]) -> list[checks.CheckMessage]:
    from .keys import client_curve

    try:
        client_curve(options["server_key"], options["client_key"])
    except (OSError, ValueError) as exc:
        message = f"CHANNEL_LAYERS[{alias!r}]: bad server_key/client_key: {exc}"
        return [checks.Error(message, id="django_message_broker.E004")]
    return []


def _check_server_settings() -> list[checks.CheckMessage]:
    """``MESSAGE_BROKER_SERVER`` (read by ``manage.py runbroker``)."""
    from .keys import server_curve
    from .server.server import check_bind

    conf = getattr(settings, "MESSAGE_BROKER_SERVER", None)
    if not conf:
        return []
    if not isinstance(conf, dict):
        return [checks.Error("MESSAGE_BROKER_SERVER must be a dict.", id="django_message_broker.E005")]
    messages: list[checks.CheckMessage] = []
    bind = conf.get("bind") or _default_layer_address()  # what runbroker would bind
    try:
        server_curve(conf.get("secret_key"))
        if bind:
            check_bind(
                bind,
                secret_key=conf.get("secret_key"),
                authorized_keys=conf.get("authorized_keys"),
                insecure=bool(conf.get("insecure")),
            )
    except (OSError, ValueError) as exc:
        messages.append(checks.Error(f"MESSAGE_BROKER_SERVER: {exc}", id="django_message_broker.E005"))
    else:
        if bind and not is_local_address(bind) and not conf.get("secret_key"):
            messages.append(
                checks.Warning(
                    f"MESSAGE_BROKER_SERVER: the broker serves plain text on {bind} (insecure).",
                    hint="Give it a secret_key and authorized_keys (docs/security.md).",
                    id="django_message_broker.W003",
                )
            )
    return messages


def _default_layer_address() -> str | None:
    from .layer import layer_options

    layer = (getattr(settings, "CHANNEL_LAYERS", None) or {}).get("default") or {}
    if layer.get("BACKEND") not in _BACKENDS:
        return None
    try:
        return str(layer_options(layer.get("CONFIG", {}) or {})["address"])
    except (TypeError, ValueError):
        return None
