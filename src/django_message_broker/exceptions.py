"""The exception family.

One root, ``BrokerError``. Errors the broker raises while serving a request
travel back over the wire as ``(code, detail, fields)`` and are raised in the
client as the same class with the same fields (see ``from_wire``).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationFailed",
    "BrokerError",
    "BrokerUnavailable",
    "ClientClosed",
    "InvalidName",
    "MessageTooLarge",
    "NotFound",
    "PreconditionFailed",
    "ProtocolError",
    "QueueFull",
    "ResourceLocked",
    "SubscriptionError",
    "from_wire",
]


class BrokerError(Exception):
    """Root of every error this package raises on purpose."""

    #: Wire code; 0 is "ok", so every error has a non-zero code.
    code: ClassVar[int] = 99

    def fields(self) -> dict[str, Any]:
        """The data that travels with the error (constructor keywords)."""
        return {}


class ProtocolError(BrokerError):
    """A peer sent something that breaks the protocol (malformed frame,
    unknown command, wrong version). The connection stays usable."""

    code = 5


class QueueFull(BrokerError):
    """The channel already holds ``capacity`` messages, or (``reason`` set)
    the broker refused for another reason, such as its memory limit."""

    code = 1

    def __init__(self, channel: str = "", capacity: int = 0, reason: str = "") -> None:
        if reason:
            super().__init__(f"channel {channel!r} refused the message: {reason}")
        else:
            super().__init__(f"channel {channel!r} is full (capacity {capacity})")
        self.channel = channel
        self.capacity = capacity
        self.reason = reason

    def fields(self) -> dict[str, Any]:
        if self.reason:
            return {"channel": self.channel, "capacity": self.capacity, "reason": self.reason}
        return {"channel": self.channel, "capacity": self.capacity}


class MessageTooLarge(BrokerError):
    """A message body is larger than the broker accepts."""

    code = 2

    def __init__(self, size: int = 0, limit: int = 0) -> None:
        super().__init__(f"message of {size} bytes is over the {limit} byte limit")
        self.size = size
        self.limit = limit

    def fields(self) -> dict[str, Any]:
        return {"size": self.size, "limit": self.limit}


class InvalidName(BrokerError, TypeError):
    """A channel or group name is not valid. Also a ``TypeError``, which is
    what Channels raises for bad names."""

    code = 3

    def __init__(self, name: Any = "", reason: str = "invalid name") -> None:
        super().__init__(f"{reason}: {name!r}")
        self.name = name
        self.reason = reason

    def fields(self) -> dict[str, Any]:
        return {"name": self.name if isinstance(self.name, str) else repr(self.name), "reason": self.reason}


class SubscriptionError(BrokerError):
    """A subscription was refused: a process channel (name containing ``!``)
    already has another endpoint, or an unknown endpoint was discarded."""

    code = 4

    def __init__(self, detail: str = "subscription refused", channel: str = "") -> None:
        super().__init__(detail)
        self.channel = channel

    def fields(self) -> dict[str, Any]:
        return {"detail": str(self), "channel": self.channel}


class BrokerUnavailable(BrokerError, TimeoutError):
    """No broker answered within the timeout."""

    code = 6

    def __init__(self, address: str = "", timeout: float = 0.0) -> None:
        super().__init__(f"no broker answered at {address} within {timeout:g}s")
        self.address = address
        self.timeout = timeout

    def fields(self) -> dict[str, Any]:
        return {"address": self.address, "timeout": self.timeout}


class ClientClosed(BrokerError):
    """The client was closed while the call was pending, or before it."""

    code = 7


class AuthenticationFailed(BrokerError):
    """The broker refused this client's security handshake: its key is not
    authorized (or was revoked), the server key is wrong, or only one side
    uses CURVE. Raised by every pending and later call until a handshake
    succeeds. Deliberately vague: the broker tells a refused client nothing."""

    code = 8

    def __init__(self, address: str = "", reason: str = "the handshake failed") -> None:
        super().__init__(f"the broker at {address} refused this client ({reason})")
        self.address = address
        self.reason = reason

    def fields(self) -> dict[str, Any]:
        return {"address": self.address, "reason": self.reason}


class NotFound(BrokerError):
    """A task queue or exchange does not exist (AMQP's 404). ``kind`` is
    ``"queue"`` or ``"exchange"``."""

    code = 10

    def __init__(self, detail: str = "not found", kind: str = "", name: str = "") -> None:
        super().__init__(detail)
        self.kind = kind
        self.name = name

    def fields(self) -> dict[str, Any]:
        return {"detail": str(self), "kind": self.kind, "name": self.name}


class ResourceLocked(BrokerError):
    """The task queue is exclusive to another connection (AMQP's 405)."""

    code = 11

    def __init__(self, detail: str = "resource locked", name: str = "") -> None:
        super().__init__(detail)
        self.name = name

    def fields(self) -> dict[str, Any]:
        return {"detail": str(self), "name": self.name}


class PreconditionFailed(BrokerError):
    """A declaration contradicts what exists, or a conditional delete found
    the queue in use (AMQP's 406)."""

    code = 12

    def __init__(self, detail: str = "precondition failed") -> None:
        super().__init__(detail)

    def fields(self) -> dict[str, Any]:
        return {"detail": str(self)}


_BY_CODE: dict[int, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        QueueFull,
        MessageTooLarge,
        InvalidName,
        SubscriptionError,
        BrokerUnavailable,
        ClientClosed,
        AuthenticationFailed,
        NotFound,
        ResourceLocked,
        PreconditionFailed,
    )
}


def from_wire(code: int, detail: str, fields: Any) -> BrokerError:
    """Rebuild the exception a peer reported."""
    cls = _BY_CODE.get(code, BrokerError)
    if isinstance(fields, dict) and fields:
        try:
            return cls(**fields)
        except TypeError:
            pass
    err = cls.__new__(cls)
    Exception.__init__(err, detail)
    for key, value in (fields or {}).items() if isinstance(fields, dict) else ():
        setattr(err, key, value)
    return err
