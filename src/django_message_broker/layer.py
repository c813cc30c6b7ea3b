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

Namespaces. Channel and group names travel as ``prefix.name``, where
``prefix`` is the ``CONFIG`` key, by default derived from the project's base
directory (``namespace.py``), so two projects on one broker never meet and
``flush()`` empties only this project's channels and groups. Users only ever
see their own names: ``new_channel()`` returns an unprefixed name, and
capacity rules match unprefixed names (``GroupSend.prefix``).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Optional

from channels import exceptions as channels_exceptions
from channels.layers import BaseChannelLayer

from . import exceptions
from .client import AsyncClient
from .messages import decode_message, decode_shared, encode_message
from .namespace import default_prefix
from .options import LayerOptions
from .protocol import NameCache, check_channel_name

__all__ = [
    "ChannelFull",
    "ChannelsServerLayer",
    "ForeignChannel",
    "MessageTooLarge",
    "capacity_rules",
    "check_own_channel",
    "decode_message",
    "encode_message",
    "layer_options",
]

logger = logging.getLogger("django_message_broker.layer")


class ChannelFull(channels_exceptions.ChannelFull, exceptions.QueueFull):
    """Raised by ``send`` at capacity: both Channels' and our own class."""


class MessageTooLarge(channels_exceptions.MessageTooLarge, exceptions.MessageTooLarge):
    """A message too large for the broker: both Channels' and our own class."""


class ForeignChannel(exceptions.SubscriptionError, AssertionError):
    """``receive()`` on a process-specific channel (``!``) that this layer
    instance did not make: another instance or process owns it, so the
    receive would never get a message. Raised at once. Also an
    ``AssertionError``, which is what channels_redis raises ("Wrong client
    prefix"), so code and tests written for either layer catch it."""


def check_own_channel(channel: str, client_prefix: str) -> None:
    """Raise ``ForeignChannel`` unless a ``!`` channel was made by the
    instance whose ``new_channel()`` names carry ``client_prefix``. A name
    that is not valid at all is a ``TypeError`` (``InvalidName``) first:
    Channels' own check lets a trailing newline through (its regex ends in
    ``$``), ours does not."""
    check_channel_name(channel)
    head, bang, _ = channel.partition("!")
    if bang and not head.endswith("." + client_prefix) and head != client_prefix:
        raise ForeignChannel(
            f"{channel!r} is another layer instance's process-specific channel: only the instance "
            "whose new_channel() made it can receive from it",
            channel,
        )


def layer_options(config: dict[str, Any]) -> dict[str, Any]:
    """The client options of a ``CONFIG`` dict, checked (raises ``TypeError``
    or ``ValueError`` naming the key; see ``options.LayerOptions``)."""
    return LayerOptions.from_config(config).client.as_dict()


def compile_capacities(channel_capacity: dict[Any, int]) -> list[tuple[re.Pattern, int]]:
    """Globs or compiled regexes -> compiled patterns (Channels 4.3.2's base
    class stores them uncompiled; we compile them ourselves)."""
    return BaseChannelLayer.compile_capacities(None, channel_capacity or {})  # type: ignore[arg-type]


def capacity_rules(compiled: list[tuple[re.Pattern, int]]) -> list[tuple[str, int]]:
    """The rules as the broker takes them (pattern source, capacity), so that
    ``group_send`` gives each member its own capacity."""
    return [(pattern.pattern, capacity) for pattern, capacity in compiled]


_DEFAULTS = LayerOptions()


class ChannelsServerLayer(BaseChannelLayer):
    """A Channels layer on django-message-broker. See the module docstring."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        expiry: float = _DEFAULTS.expiry,
        group_expiry: float = _DEFAULTS.group_expiry,
        capacity: int = _DEFAULTS.capacity,
        channel_capacity: Optional[dict[Any, int]] = None,
        **config: Any,
    ) -> None:
        """Takes the ``CONFIG`` keys (see README, "CONFIG"), each checked
        here: ``TypeError`` for an unknown key or a wrong type, ``ValueError``
        for a bad value."""
        config.update(expiry=expiry, group_expiry=group_expiry, capacity=capacity, channel_capacity=channel_capacity)
        options = LayerOptions.from_config(config)
        super().__init__(expiry=options.expiry, capacity=options.capacity, channel_capacity=None)
        self.channel_capacity = compile_capacities(options.channel_capacity or {})
        self._capacity_rules = capacity_rules(self.channel_capacity)
        self.group_expiry = options.group_expiry
        self.options = options.client
        self.address = options.client.address
        #: The namespace on the broker ("": none); names go out as "prefix.name".
        self.prefix = default_prefix() if options.prefix is None else options.prefix
        self._wire = f"{self.prefix}." if self.prefix else ""
        #: This layer's part of ``new_channel()`` names: random, so unique
        #: across processes and unaffected by ``random.seed()``.
        self.client_prefix = uuid.uuid4().hex
        self._client: Optional[AsyncClient] = None
        self._valid_names = NameCache()
        #: Names ``receive`` found valid and ours (``check_own_channel``).
        self._receivable = NameCache()

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
            self._client = AsyncClient(**self.options.as_dict(), shared=True)
        return self._client

    # -- the contract ---------------------------------------------------------
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``. Raises ``ChannelFull`` at capacity."""
        self.require_valid_channel_name(channel)
        body = encode_message(message)
        try:
            await self.client.send(self._wire + channel, body, ttl=self.expiry, capacity=self.get_capacity(channel))
        except exceptions.QueueFull as exc:
            raise ChannelFull(channel, exc.capacity, getattr(exc, "reason", "")) from None
        except exceptions.MessageTooLarge as exc:
            raise MessageTooLarge(exc.size, exc.limit) from None

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``. Cancelling it loses nothing.
        Raises ``ForeignChannel`` at once for another instance's ``!``
        channel."""
        if channel not in self._receivable:  # both checks passed before: once per name, not per receive
            self.require_valid_channel_name(channel)
            check_own_channel(channel, self.client_prefix)
            self._receivable.add(channel)
        body, _, shared = await self.client.receive_item(self._wire + channel)
        return decode_shared(body, shared)  # decoded once per process for a group_send

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, unique across processes.
        Its messages start coming to this process now, ahead of its first
        receive: a consumer receives on it at once, and a group_send finds
        it ready (they go back to the broker if no receive comes within
        ``idle_return``)."""
        channel = f"{prefix}.{self.client_prefix}!{uuid.uuid4().hex}"
        self.client.fetch_ahead(self._wire + channel)
        return channel

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self.client.group_add(self._wire + group, self._wire + channel, ttl=self.group_expiry)

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self.client.group_discard(self._wire + group, self._wire + channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; full members are skipped (and logged)."""
        self.require_valid_group_name(group)
        body = encode_message(message)

        def skipped(sent: int, skipped: int) -> None:
            logger.info("%s of %s channels over capacity in group %s", skipped, sent + skipped, group)

        try:
            await self.client.group_send_pipelined(  # as send: no round trip per group_send
                self._wire + group,
                body,
                ttl=self.expiry,
                capacity=self.capacity,
                capacities=self._capacity_rules,
                prefix=self.prefix,
                on_skipped=skipped,
            )
        except exceptions.MessageTooLarge as exc:
            raise MessageTooLarge(exc.size, exc.limit) from None

    async def flush(self) -> None:
        """Empty every channel and group of this layer's namespace (with
        ``prefix=""``: every one on the broker)."""
        await self.client.flush(self.prefix)

    async def close(self) -> None:
        """Close this layer's connection (a later call opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # channels_redis spells it close_pools(); the channels test helpers call close().
    close_pools = close
