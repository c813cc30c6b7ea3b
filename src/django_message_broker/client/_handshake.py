"""CURVE handshake outcomes (docs/security.md), decided without I/O.

How it works. The driver reads handshake events from its socket monitor and
reports them here as ``succeeded()`` or ``failed(kind, now, retry)``. A
refusal sets ``error`` (an ``AuthenticationFailed``), which every pending
and later call gets until a handshake succeeds; ``retry_due`` says when to
reconnect to find out (libzmq does not retry a refused handshake by itself).
"""

from __future__ import annotations

from typing import Optional

from ..exceptions import AuthenticationFailed

__all__ = ["Handshake"]

_REASONS = {
    "auth": "key not authorized",
    "protocol": "security mismatch: CURVE on one side only, or not a broker",
    "vague": "handshake failed: wrong server key?",
}


class Handshake:
    def __init__(self, address: str, curve: bool) -> None:
        self.address = address
        self.curve = curve  # this client uses CURVE
        #: Set while the broker refuses our handshake: every call fails with it.
        self.error: Optional[AuthenticationFailed] = None
        self._vague = 0  # handshakes failed without detail, in a row
        self._retry_at = 0.0

    def succeeded(self) -> bool:
        """A handshake succeeded. True if that ends a refusal."""
        self._vague = 0
        if self.error is None:
            return False
        self.error = None
        return True

    def failed(self, kind: str, now: float, retry: float) -> bool:
        """A handshake failed: ``kind`` is ``"auth"``, ``"protocol"`` or
        ``"vague"`` (no detail). True if this client is now refused."""
        if kind == "vague":
            # A wrong server key looks like this, repeated at every reconnect
            # (~50 ms apart); a single one is also what a broker going away
            # mid-handshake looks like, so it takes two in a row. Without
            # CURVE it is never about keys (a peer that is not a broker, a
            # proxy with no backend): left to the usual timeouts.
            if not self.curve:
                return False
            self._vague += 1
            if self._vague < 2:
                return False
        self.error = AuthenticationFailed(self.address, _REASONS[kind])
        self._retry_at = now + retry
        return True

    def retry_due(self, now: float, retry: float) -> bool:
        """While refused: True every ``retry`` seconds, to try again."""
        if now < self._retry_at:
            return False
        self._retry_at = now + retry
        return True
