"""Byte sizes: parsing ``256MB`` / ``1GiB``, and the broker's default memory limit.

Pure: no I/O beyond ``os.sysconf`` and, in ``process_rss``, ``/proc/self/statm``.
"""

from __future__ import annotations

import os
import re

__all__ = ["MESSAGE_OVERHEAD", "default_max_memory", "format_size", "parse_size", "process_rss"]

#: Bytes the broker counts for each queued message on top of its body: the
#: message object, its deque slot and (for large bodies) the zmq.Frame. Tiny
#: messages are bounded too, not only large ones.
MESSAGE_OVERHEAD = 128

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30, ``"4096"`` -> 4096.
    Decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB, MiB,
    GiB) powers of 1024. Raises ValueError for anything else or for zero."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(f"not a size: {text!r} (use bytes, or e.g. 256MB, 1GiB)")
        value = int(float(match.group(1)) * unit)
    if value < 1:
        raise ValueError(f"a size must be at least 1 byte, not {text!r}")
    return value


def format_size(size: int) -> str:
    """A size as people wrote it: ``268435456`` -> ``"256 MiB"``,
    ``256000000`` -> ``"256 MB"``; else in MiB (or KiB) with one decimal."""
    exact = (("GiB", 1 << 30), ("MiB", 1 << 20), ("GB", 10**9), ("MB", 10**6), ("KiB", 1 << 10), ("kB", 1000))
    for unit, scale in exact:
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def default_max_memory() -> int:
    """A quarter of the host's physical memory (1 GiB if it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return total // 4 if total > 0 else 1 << 30


def process_rss() -> int | None:
    """This process's resident memory in bytes (Linux: ``/proc/self/statm``;
    elsewhere the peak, from ``getrusage``), or None if unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError, ValueError):
        return None
