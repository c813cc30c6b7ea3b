"""Django set-up for tests/django only.

Django is configured (from tests/django/settings.py) by an autouse fixture
of this directory, when its first test runs, not at import: collecting the
whole test tree does not configure Django for the other directories. At the
end of each module the settings are unconfigured again, so a later test
elsewhere (say, a ``ProcessClient()`` that reads ``CHANNEL_LAYERS`` when
Django is configured) does not see them. The apps registry stays populated,
which is harmless.

Subprocesses get the same settings as ``DJANGO_SETTINGS_MODULE=settings``
(see ``django_env``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from dmb_helpers import Spawner

HERE = Path(__file__).resolve().parent
BACKEND = "django_message_broker.ChannelsServerLayer"


def _settings_values() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("dmb_django_test_settings", HERE / "settings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DMB_TEST_")}
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.update(saved)
    return {name: getattr(module, name) for name in dir(module) if name.isupper()}


@pytest.fixture(scope="module", autouse=True)
def django_configured() -> Iterator[None]:
    from django.conf import settings
    from django.utils.functional import empty

    import django

    configured_here = False
    if not settings.configured:
        settings.configure(**_settings_values())
        configured_here = True
    django.setup()
    try:
        yield
    finally:
        if configured_here:
            from channels.layers import channel_layers

            channel_layers.backends = {}
            settings._wrapped = empty


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()


@pytest.fixture
async def use_layers(broker: Any) -> Any:
    """``await use_layers(**config)``: ``CHANNEL_LAYERS["default"]`` (and more
    aliases with ``aliases={name: config}``) point at our layer on the
    ``broker`` fixture (``address`` and ``embedded=False`` unless given).
    Every layer made from these settings is closed at teardown."""
    from channels.layers import channel_layers
    from django.test.utils import override_settings

    overrides: list[Any] = []
    made: list[Any] = []

    def remember() -> None:
        made.extend(layer for layer in channel_layers.backends.values() if layer not in made)

    async def apply(aliases: Optional[dict[str, dict[str, Any]]] = None, **config: Any) -> dict[str, Any]:
        remember()
        layers = {}
        for alias, conf in {"default": config, **(aliases or {})}.items():
            conf = dict(conf)
            if "address" not in conf and "ip_address" not in conf and "port" not in conf:
                conf["address"] = broker.address
            conf.setdefault("embedded", False)
            layers[alias] = {"BACKEND": conf.pop("BACKEND", BACKEND), "CONFIG": conf}
        override = override_settings(CHANNEL_LAYERS=layers)
        override.enable()
        overrides.append(override)
        return layers

    yield apply
    remember()
    for layer in made:
        close = getattr(layer, "close", None)
        if close is not None:
            await close()
    for override in reversed(overrides):
        override.disable()
