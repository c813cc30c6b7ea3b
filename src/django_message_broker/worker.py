"""``ProcessClient``: the channel layer's operations for plain worker
processes (no ASGI server, no event loop needed).

Messages are the same dicts the Channels layer carries, so a worker can post
to a chat room's group and a consumer receives it. Sync methods have plain
names; their async twins start with ``a`` (``asend``, ``areceive``...), as
in Django's async ORM. Configure it with the layer's ``CONFIG`` keys, or let
it read ``settings.CHANNEL_LAYERS[alias]["CONFIG"]``::

    from django_message_broker import ProcessClient

    with ProcessClient() as client:
        client.group_send("room-lobby", {"type": "chat.message", "text": "hi"})
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from . import exceptions
from .client import AsyncClient, SyncClient
from .layer import (
    BaseChannelLayer,
    ChannelFull,
    MessageTooLarge,
    capacity_rules,
    check_own_channel,
    compile_capacities,
    encode_message,
)
from .messages import decode_shared
from .namespace import default_prefix
from .options import LayerOptions

__all__ = ["ProcessClient"]


def _settings_config(alias: str) -> dict[str, Any]:
    try:
        from django.conf import settings

        layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    except Exception:  # Django missing or not configured
        return {}
    return dict(layers.get(alias, {}).get("CONFIG", {}))


class ProcessClient:
    """Send, receive and manage groups from a worker process."""

    def __init__(self, config: Optional[dict[str, Any]] = None, *, alias: str = "default", **options: Any) -> None:
        """``config`` and ``options``: the layer's ``CONFIG`` keys, each
        checked here (``TypeError``: unknown key or wrong type;
        ``ValueError``: bad value). With neither, ``CHANNEL_LAYERS[alias]``."""
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"ProcessClient config must be a dict, not {type(config).__name__}")
        merged = _settings_config(alias) if config is None and not options else dict(config or {})
        merged.update(options)
        checked = LayerOptions.from_config(merged, owner="ProcessClient")
        self.expiry = checked.expiry
        self.group_expiry = checked.group_expiry
        self.capacity = checked.capacity
        self.channel_capacity = compile_capacities(checked.channel_capacity or {})
        self._capacity_rules = capacity_rules(self.channel_capacity)
        self.options = checked.client
        #: The namespace on the broker (see ``layer.py``): the layer's, by default.
        self.prefix = default_prefix() if checked.prefix is None else checked.prefix
        self._wire = f"{self.prefix}." if self.prefix else ""
        self._validator = BaseChannelLayer()
        self.client_prefix = uuid.uuid4().hex
        self._sync = SyncClient(**self.options.as_dict(), shared=True)
        self._async = self._sync.twin(AsyncClient)

    def __enter__(self) -> ProcessClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._sync.close()

    def get_capacity(self, channel: str) -> int:
        for pattern, capacity in self.channel_capacity:
            if pattern.match(channel):
                return capacity
        return self.capacity

    def new_channel(self, prefix: str = "specific") -> str:
        return f"{prefix}.{self.client_prefix}!{uuid.uuid4().hex}"

    def _prepare(self, channel: str, message: Any) -> bytes:
        self._validator.require_valid_channel_name(channel)
        return encode_message(message)

    # -- sync ------------------------------------------------------------------
    def send(self, channel: str, message: dict[str, Any]) -> None:
        body = self._prepare(channel, message)
        with _mapped_errors(channel):
            self._sync.send(self._wire + channel, body, ttl=self.expiry, capacity=self.get_capacity(channel))

    def receive(self, channel: str, timeout: Optional[float] = None) -> dict[str, Any]:
        """The next message; ``TimeoutError`` after ``timeout`` seconds."""
        self._validator.require_valid_channel_name(channel)
        check_own_channel(channel, self.client_prefix)
        body, _, shared = self._sync.receive_item(self._wire + channel, timeout)
        return decode_shared(body, shared)

    def group_add(self, group: str, channel: str) -> None:
        self._validator.require_valid_group_name(group)
        self._validator.require_valid_channel_name(channel)
        self._sync.group_add(self._wire + group, self._wire + channel, ttl=self.group_expiry)

    def group_discard(self, group: str, channel: str) -> None:
        self._validator.require_valid_group_name(group)
        self._validator.require_valid_channel_name(channel)
        self._sync.group_discard(self._wire + group, self._wire + channel)

    def group_send(self, group: str, message: dict[str, Any]) -> tuple[int, int]:
        """Returns ``(delivered, skipped)``: members over capacity are skipped."""
        self._validator.require_valid_group_name(group)
        body = encode_message(message)
        with _mapped_errors(group):
            return self._sync.group_send(
                self._wire + group,
                body,
                ttl=self.expiry,
                capacity=self.capacity,
                capacities=self._capacity_rules,
                prefix=self.prefix,
            )

    def flush(self) -> None:
        """Empty every channel and group of this client's namespace."""
        self._sync.flush(self.prefix)

    # -- async -----------------------------------------------------------------
    async def asend(self, channel: str, message: dict[str, Any]) -> None:
        body = self._prepare(channel, message)
        with _mapped_errors(channel):
            await self._async.send(self._wire + channel, body, ttl=self.expiry, capacity=self.get_capacity(channel))

    async def areceive(self, channel: str) -> dict[str, Any]:
        self._validator.require_valid_channel_name(channel)
        check_own_channel(channel, self.client_prefix)
        body, _, shared = await self._async.receive_item(self._wire + channel)
        return decode_shared(body, shared)

    async def agroup_add(self, group: str, channel: str) -> None:
        self._validator.require_valid_group_name(group)
        self._validator.require_valid_channel_name(channel)
        await self._async.group_add(self._wire + group, self._wire + channel, ttl=self.group_expiry)

    async def agroup_discard(self, group: str, channel: str) -> None:
        self._validator.require_valid_group_name(group)
        self._validator.require_valid_channel_name(channel)
        await self._async.group_discard(self._wire + group, self._wire + channel)

    async def agroup_send(self, group: str, message: dict[str, Any]) -> tuple[int, int]:
        self._validator.require_valid_group_name(group)
        body = encode_message(message)
        with _mapped_errors(group):
            return await self._async.group_send(
                self._wire + group,
                body,
                ttl=self.expiry,
                capacity=self.capacity,
                capacities=self._capacity_rules,
                prefix=self.prefix,
            )

    async def aflush(self) -> None:
        await self._async.flush(self.prefix)


@contextmanager
def _mapped_errors(name: str) -> Iterator[None]:
    """Raise the layer's classes (Channels' and ours at once)."""
    try:
        yield
    except (ChannelFull, MessageTooLarge):
        raise
    except exceptions.QueueFull as exc:
        raise ChannelFull(name, exc.capacity, getattr(exc, "reason", "")) from None
    except exceptions.MessageTooLarge as exc:
        raise MessageTooLarge(exc.size, exc.limit) from None
