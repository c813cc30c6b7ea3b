"""Group membership with expiry. Pure: time is passed in as ``now``."""

from __future__ import annotations

__all__ = ["Groups"]


class Groups:
    """group name -> {channel name: monotonic deadline}."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, group: str, channel: str, ttl: float, now: float) -> None:
        """Add ``channel`` (or renew it) for ``ttl`` seconds. Idempotent."""
        self._groups.setdefault(group, {})[channel] = now + ttl

    def discard(self, group: str, channel: str) -> None:
        """Remove ``channel``; a no-op when it is not a member."""
        members = self._groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self._groups[group]

    def members(self, group: str, now: float) -> list[str]:
        """The live members, in the order they were added; drops expired ones."""
        members = self._groups.get(group)
        if not members:
            return []
        live = [c for c, deadline in members.items() if deadline > now]
        if len(live) != len(members):
            self._expire(group, now)
        return live

    def _expire(self, group: str, now: float) -> None:
        members = self._groups[group]
        for channel in [c for c, d in members.items() if d <= now]:
            del members[channel]
        if not members:
            del self._groups[group]

    def sweep(self, now: float) -> None:
        for group in list(self._groups):
            self._expire(group, now)

    def clear(self, prefix: str = "") -> None:
        """Drop every group, or those named ``prefix.*``."""
        if not prefix:
            self._groups.clear()
            return
        start = prefix + "."
        for group in [g for g in self._groups if g.startswith(start)]:
            del self._groups[group]

    def memberships(self) -> int:
        return sum(len(m) for m in self._groups.values())
