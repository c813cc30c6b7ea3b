"""django-message-broker: an all-in-one message broker for Django.

The Channels layer (``ChannelsServerLayer``) and the worker client
(``ProcessClient``) are imported lazily, so that the broker and the plain
clients work without Django installed.
"""

from __future__ import annotations

from typing import Any

from .client import AsyncClient, SyncClient
from .exceptions import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnavailable,
    ClientClosed,
    InvalidName,
    MessageTooLarge,
    ProtocolError,
    QueueFull,
    SubscriptionError,
)
from .server import BrokerServer

__version__ = "0.3.0"

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "BrokerError",
    "BrokerServer",
    "BrokerUnavailable",
    "ChannelsServerLayer",
    "ClientClosed",
    "InvalidName",
    "MessageTooLarge",
    "ProcessClient",
    "ProtocolError",
    "QueueFull",
    "SubscriptionError",
    "SyncClient",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "ChannelsServerLayer":
        from .layer import ChannelsServerLayer

        return ChannelsServerLayer
    if name == "ProcessClient":
        from .worker import ProcessClient

        return ProcessClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
