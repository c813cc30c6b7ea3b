"""The cores of this process, across ``fork()`` and exit.

How it works. Every live ``Core`` is tracked here. A script that sends and
exits without ``close()`` still sends: the cores are closed at exit (an
atexit handler, and a ``multiprocessing`` finalizer for children that end
with ``os._exit()``). After ``fork()`` the child bumps the *generation*: a
core made under an earlier one is the parent's (its socket, I/O thread and
ZeroMQ context), and the child must neither use nor close it
(``Core.inherited``); the faces build a fresh core on next use.
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import Any, Protocol

__all__ = ["generation", "track", "untrack"]


class _Closable(Protocol):
    def close(self, timeout: float = ...) -> None: ...


_live_cores: weakref.WeakSet[Any] = weakref.WeakSet()
_fork_generation = 0
#: The parent's cores, kept alive in the child so that nothing here ever
#: finalizes (closes) the parent's sockets.
_inherited: list[Any] = []
_exit_flush_pid = 0


def generation() -> int:
    """Bumped in a child process right after ``fork()``."""
    return _fork_generation


def track(core: _Closable) -> None:
    _live_cores.add(core)
    _flush_at_process_exit()


def untrack(core: _Closable) -> None:
    _live_cores.discard(core)


def _forget_parent_cores() -> None:
    global _fork_generation
    _fork_generation += 1
    _inherited.extend(_live_cores)
    _live_cores.clear()


os.register_at_fork(after_in_child=_forget_parent_cores)


@atexit.register
def _close_live_cores() -> None:
    """A script that sends and exits without close() still sends."""
    for core in list(_live_cores):
        core.close(timeout=1.0)


def _flush_at_process_exit() -> None:
    """The same for a ``multiprocessing`` child, which ends with
    ``os._exit()`` after its finalizers, without running atexit handlers."""
    global _exit_flush_pid
    pid = os.getpid()
    if _exit_flush_pid != pid:
        _exit_flush_pid = pid
        import multiprocessing.util

        multiprocessing.util.Finalize(None, _close_live_cores, exitpriority=0)
