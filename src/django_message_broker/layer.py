"""The Django Channels layer: ``ChannelsServerLayer``.

Configure it like any layer::

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "django_message_broker.ChannelsServerLayer",
            "CONFIG": {"address": "tcp://127.0.0.1:5556"},  # all keys optional
        }
    }

For a broker on another host, add ``"server_key"`` (the broker's public
certificate file) and ``"client_key"`` (this host's secret certificate
file): see docs/security.md.

Messages are dicts, encoded with msgpack (msgspec); the broker never looks
inside them. Names are checked with Channels' own rules (``TypeError``).
With ``embedded`` (the default for a local address) the first use starts a
broker for the whole host if none answers (see ``embedded.py``).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Optional

import msgspec
from channels import exceptions as channels_exceptions
from channels.layers import BaseChannelLayer

from . import exceptions
from .client import AsyncClient
from .embedded import is_local_address
from .protocol import NameCache
from .server.server import DEFAULT_ADDRESS

__all__ = ["ChannelFull", "ChannelsServerLayer", "MessageTooLarge", "capacity_rules", "layer_options"]

logger = logging.getLogger("django_message_broker.layer")


class ChannelFull(channels_exceptions.ChannelFull, exceptions.QueueFull):
    """Raised by ``send`` at capacity: both Channels' and our own class."""


class MessageTooLarge(channels_exceptions.MessageTooLarge, exceptions.MessageTooLarge):
    """A message too large for the broker: both Channels' and our own class."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)


def encode_message(message: Any) -> bytes:
    if not isinstance(message, dict):
        raise TypeError(f"a channel layer message must be a dict, not {type(message).__name__}")
    try:
        return _encoder.encode(message)
    except (TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise TypeError(f"message cannot be serialized: {exc}") from None


def decode_message(body: bytes) -> dict[str, Any]:
    return _decoder.decode(body)


def layer_options(config: dict[str, Any]) -> dict[str, Any]:
    """The client options of a ``CONFIG`` dict (shared with ``ProcessClient``).
    ``address`` wins over the predecessor's ``ip_address``/``port``."""
    address = config.get("address")
    if address is None and ("ip_address" in config or "port" in config):
        address = f"tcp://{config.get('ip_address', '127.0.0.1')}:{config.get('port', 5556)}"
    address = address or DEFAULT_ADDRESS
    # --- CURVE (docs/security.md): the broker's public certificate (file or
    # Z85 text) and this client's secret certificate file.
    server_key = config.get("server_key") or None
    client_key = config.get("client_key") or None
    embedded = config.get("embedded")
    if embedded is None:  # an embedded broker has no secret key: never with server_key
        embedded = is_local_address(address) and not address.startswith("inproc://") and server_key is None
    options = {
        "address": address,
        "embedded": bool(embedded),
        "timeout": float(config.get("timeout", 5.0)),
        "heartbeat": float(config.get("heartbeat", 1.0)),
        "prefetch": int(config.get("prefetch", 16)),
        "process_prefetch": int(config.get("process_prefetch", 128)),
        "idle_return": float(config.get("idle_return", 1.0)),
        "embedded_idle_timeout": float(config.get("embedded_idle_timeout", 60.0)),
        "server_key": server_key,
        "client_key": client_key,
    }
    return options


def compile_capacities(channel_capacity: dict[Any, int]) -> list[tuple[re.Pattern, int]]:
    """Globs or compiled regexes -> compiled patterns (Channels 4.3.2's base
    class stores them uncompiled; we compile them ourselves)."""
    return BaseChannelLayer.compile_capacities(None, channel_capacity or {})  # type: ignore[arg-type]


def capacity_rules(compiled: list[tuple[re.Pattern, int]]) -> list[tuple[str, int]]:
    """The rules as the broker takes them (pattern source, capacity), so that
    ``group_send`` gives each member its own capacity."""
    return [(pattern.pattern, capacity) for pattern, capacity in compiled]


class ChannelsServerLayer(BaseChannelLayer):
    """A Channels layer on django-message-broker. See the module docstring."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: Optional[dict[Any, int]] = None,
        **config: Any,
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        self.channel_capacity = compile_capacities(channel_capacity or {})
        self._capacity_rules = capacity_rules(self.channel_capacity)
        self.group_expiry = group_expiry
        unknown = set(config) - {
            "address",
            "ip_address",
            "port",
            "embedded",
            "timeout",
            "heartbeat",
            "prefetch",
            "process_prefetch",
            "idle_return",
            "embedded_idle_timeout",
            "server_key",  # CURVE
            "client_key",  # CURVE
        }
        if unknown:
            raise TypeError(f"unknown ChannelsServerLayer option(s): {', '.join(sorted(unknown))}")
        self.options = layer_options(config)
        self.address = self.options["address"]
        #: This layer's part of ``new_channel()`` names: random, so unique
        #: across processes and unaffected by ``random.seed()``.
        self.client_prefix = uuid.uuid4().hex
        self._client: Optional[AsyncClient] = None
        self._valid_names = NameCache()

    def require_valid_channel_name(self, name: Any, receive: bool = False) -> bool:
        """Channels' check, remembered for names that passed (it is on every
        send and receive)."""
        if not receive and name in self._valid_names:
            return True
        super().require_valid_channel_name(name, receive=receive)
        if not receive:
            self._valid_names.add(name)
        return True

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(**self.options, shared=True)
        return self._client

    # -- the contract ---------------------------------------------------------
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``. Raises ``ChannelFull`` at capacity."""
        self.require_valid_channel_name(channel)
        body = encode_message(message)
        try:
            await self.client.send(channel, body, ttl=self.expiry, capacity=self.get_capacity(channel))
        except exceptions.QueueFull as exc:
            raise ChannelFull(channel, exc.capacity) from None
        except exceptions.MessageTooLarge as exc:
            raise MessageTooLarge(exc.size, exc.limit) from None

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``. Cancelling it loses nothing."""
        self.require_valid_channel_name(channel)
        return decode_message(await self.client.receive(channel))

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, unique across processes."""
        return f"{prefix}.{self.client_prefix}!{uuid.uuid4().hex}"

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self.client.group_add(group, channel, ttl=self.group_expiry)

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self.client.group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; full members are skipped (and logged)."""
        self.require_valid_group_name(group)
        body = encode_message(message)
        try:
            sent, skipped = await self.client.group_send(
                group, body, ttl=self.expiry, capacity=self.capacity, capacities=self._capacity_rules
            )
        except exceptions.MessageTooLarge as exc:
            raise MessageTooLarge(exc.size, exc.limit) from None
        if skipped:
            logger.info("%s of %s channels over capacity in group %s", skipped, sent + skipped, group)

    async def flush(self) -> None:
        """Empty every channel and group on the broker."""
        await self.client.flush()

    async def close(self) -> None:
        """Close this layer's connection (a later call opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # channels_redis spells it close_pools(); the channels test helpers call close().
    close_pools = close
