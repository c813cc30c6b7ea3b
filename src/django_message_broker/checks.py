"""System checks: the layer's ``CONFIG``, checked as the layer checks it
(``options.config_problems``), plus warnings about risky settings.

Ids (documented in README, "System checks", and docs/security.md):

- ``E001``: a key's value has the wrong type or a bad value (the message
  names the key and what it must be), or ``CONFIG`` is not a dict.
- ``E002``: ``embedded=True`` with an address another host serves.
- ``E003``: ``capacity`` is not an int >= 1.
- ``E004``: an unknown key (a typo); the hint names the closest valid key.
- ``E005``: ``MESSAGE_BROKER_SERVER`` (read by ``runbroker``) is not valid, or
  names a bind that ``runbroker`` would refuse.
- ``E006``: ``server_key``/``client_key`` cannot be read as certificates.
- ``W001``: the (valid) address is not on loopback and the connection is
  plain text (no ``server_key``).
- ``W002``: a remote ``server_key`` without ``client_key``.
- ``W003``: the broker is set to serve plain text off loopback (``insecure``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from .options import ClientOptions

BACKEND = "django_message_broker.ChannelsServerLayer"
_BACKENDS = {BACKEND, "django_message_broker.layer.ChannelsServerLayer"}
_ADDRESS_KEYS = {"address", "ip_address", "port"}


@checks.register("django_message_broker")
def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .options import LayerOptions, config_problems, is_local_address

    messages: list[checks.CheckMessage] = []
    for alias, layer in (getattr(settings, "CHANNEL_LAYERS", None) or {}).items():
        if layer.get("BACKEND") not in _BACKENDS:
            continue
        config = layer.get("CONFIG", {})
        config = {} if config is None else config
        where = f"CHANNEL_LAYERS[{alias!r}]['CONFIG']"
        problems = config_problems(config)
        for problem in problems:
            if problem.unknown:
                messages.append(
                    checks.Error(
                        f"{where}: {problem.error}",
                        hint="Remove the key or correct its spelling.",
                        id="django_message_broker.E004",
                    )
                )
            else:
                check_id = "E003" if problem.key == "capacity" else "E001"
                messages.append(checks.Error(f"{where}: {problem.error}", id=f"django_message_broker.{check_id}"))
        if not problems:
            messages += _check_client_keys(alias, LayerOptions.from_config(config).client)
        if any(problem.key in _ADDRESS_KEYS or problem.key is None for problem in problems):
            continue  # no warnings about an address that is not valid
        # The address alone: other keys' problems are reported above.
        address_config = {key: value for key, value in config.items() if key in _ADDRESS_KEYS}
        try:
            address = LayerOptions.from_config(address_config).client.address
        except (TypeError, ValueError):  # pragma: no cover - config_problems found nothing
            continue
        if is_local_address(address):
            continue
        server_key, client_key = config.get("server_key"), config.get("client_key")
        if not server_key:
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
        elif not client_key:
            messages.append(
                checks.Warning(
                    f"CHANNEL_LAYERS[{alias!r}] has a server_key but no client_key.",
                    hint="Without client_key the connection is encrypted with a throwaway key, which a broker "
                    "with authorized keys refuses (docs/security.md).",
                    id="django_message_broker.W002",
                )
            )
        if config.get("embedded") is True:
            messages.append(
                checks.Error(
                    f"CHANNEL_LAYERS[{alias!r}]: embedded=True needs a local address, not {address}.",
                    id="django_message_broker.E002",
                )
            )
    return messages + _check_server_settings()


# --- CURVE (docs/security.md) -----------------------------------------------
def _check_client_keys(alias: str, options: ClientOptions) -> list[checks.CheckMessage]:
    from .keys import client_curve

    try:
        client_curve(options.server_key, options.client_key)
    except (OSError, ValueError) as exc:
        message = f"CHANNEL_LAYERS[{alias!r}]: bad server_key/client_key: {exc}"
        return [checks.Error(message, id="django_message_broker.E006")]
    return []


def _check_server_settings() -> list[checks.CheckMessage]:
    """``MESSAGE_BROKER_SERVER`` (read by ``manage.py runbroker``)."""
    from .keys import server_curve
    from .options import is_local_address
    from .server.server import check_bind
    from .server.store import FSYNC_MODES

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
        if conf.get("fsync") not in (None, *FSYNC_MODES):
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {conf['fsync']!r}")
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
    from .options import LayerOptions

    layer = (getattr(settings, "CHANNEL_LAYERS", None) or {}).get("default") or {}
    if layer.get("BACKEND") not in _BACKENDS:
        return None
    try:
        return LayerOptions.from_config(layer.get("CONFIG", {}) or {}).client.address
    except (TypeError, ValueError):
        return None
