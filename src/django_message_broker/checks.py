"""System checks: the layer's ``CONFIG``, checked as the layer checks it
(``options.config_problems``), plus warnings about risky settings.

Ids (documented in README, "System checks"):

- ``E001``: a key's value has the wrong type or a bad value (the message
  names the key and what it must be), or ``CONFIG`` is not a dict.
- ``E002``: ``embedded=True`` with an address another host serves.
- ``E003``: ``capacity`` is not an int >= 1.
- ``E004``: an unknown key (a typo); the hint names the closest valid key.
- ``W001``: the (valid) address is not on loopback.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

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
        if any(problem.key in _ADDRESS_KEYS or problem.key is None for problem in problems):
            continue  # no warnings about an address that is not valid
        # The address alone: other keys' problems are reported above.
        address_config = {key: value for key, value in config.items() if key in _ADDRESS_KEYS}
        try:
            address = LayerOptions.from_config(address_config).client.address
        except (TypeError, ValueError):  # pragma: no cover - config_problems found nothing
            continue
        if not is_local_address(address):
            messages.append(
                checks.Warning(
                    f"CHANNEL_LAYERS[{alias!r}] uses broker address {address}, which is not on loopback.",
                    hint="The broker has no authentication or encryption: keep it on 127.0.0.1 or ipc://, "
                    "or behind a firewall.",
                    id="django_message_broker.W001",
                )
            )
            if config.get("embedded") is True:
                messages.append(
                    checks.Error(
                        f"CHANNEL_LAYERS[{alias!r}]: embedded=True needs a local address, not {address}.",
                        id="django_message_broker.E002",
                    )
                )
    return messages
