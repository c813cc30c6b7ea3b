"""Where the embedded broker keeps its files, and the lock that guards them.

How it works. Each user has ONE runtime directory: ``$XDG_RUNTIME_DIR/
django-message-broker`` when that variable names a directory the user owns
and nobody else may enter (the XDG rules), else ``/tmp/django-message-broker-
<uid>``, created with mode 0700 and refused if another user owns it. It does
not follow ``TMPDIR``: two processes of one user with different ``TMPDIR``
must find the same lock, or both start a broker.

For an address there are three files, named after it: ``.lock`` (taken by
whoever starts a broker there, and by the broker while it removes the
files), ``.log`` (the broker's output) and ``.pid`` (its pid and address,
written once it is bound). The broker removes all three when it exits
normally (idle or a signal), under the lock, so that a starter never finds a
half-removed set. A lock file can be unlinked while someone waits on it, so
``host_lock`` checks after taking it that the path still names the file it
locked, and retries if not.

A broker killed with SIGKILL (or by the OOM killer) cannot remove its files,
so ``sweep`` removes them the next time a broker, or a client about to start
one, uses the directory (and ``status`` lists what runs). Whether a broker
still runs is decided by a lock, not by its pid (which the system may since
have given to another process): the broker holds an ``flock`` on its pid
file from before the file appears until after it has removed it, and the
kernel drops that lock when the process dies, however it dies. ``sweep``
judges an address only while it holds the address's ``.lock`` (so never
while a starter is starting a broker there, nor while a broker removes its
own files), and leaves every file of an address whose pid file is locked.
The log of a broker that is gone is kept for ``LOG_GRACE`` seconds after its
last line, to be read; its lock and pid file go at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

logger = logging.getLogger("django_message_broker.embedded")

__all__ = [
    "LOG_GRACE",
    "EmbeddedFiles",
    "HostLock",
    "PidFile",
    "RunningBroker",
    "RuntimeDirError",
    "files_for",
    "host_lock",
    "read_pid_file",
    "running_brokers",
    "runtime_dir",
    "sweep",
]

APP = "django-message-broker"
#: The fallback's parent: fixed, not ``tempfile.gettempdir()`` (which follows TMPDIR).
TMP_ROOT = "/tmp"
#: Seconds the log of a broker that is gone is kept after its last write: a
#: starter's error message points at it, and a crash may be read next day.
LOG_GRACE = 24 * 3600.0


class RuntimeDirError(RuntimeError):
    """The runtime directory exists but is not safe to use (owned by another
    user, or not a directory)."""


def _private_dir(path: str, uid: int, *, fix_mode: bool) -> Optional[str]:
    """Why ``path`` is not a directory owned by ``uid`` (``None`` if it is).
    With ``fix_mode`` a directory we own that others may enter is chmod 0700."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory"
    if info.st_uid != uid:
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if stat.S_IMODE(info.st_mode) & 0o077:
        if not fix_mode:
            return f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o})"
        os.chmod(path, 0o700)
    return None


def runtime_dir(environ: Optional[Mapping[str, str]] = None, uid: Optional[int] = None, *, create: bool = True) -> str:
    """The per-user directory of the embedded broker's files (see the module
    docstring). ``environ``/``uid`` default to this process's. Raises
    ``RuntimeDirError`` if the fallback exists and is not this user's."""
    environ = os.environ if environ is None else environ
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # pragma: no cover - Windows: no uid, no shared /tmp
        path = os.path.join(tempfile.gettempdir(), APP)
        if create:
            os.makedirs(path, exist_ok=True)
        return path
    uid = getuid() if uid is None else uid
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and _private_dir(xdg, uid, fix_mode=False) is None:
        path = os.path.join(xdg, APP)
    else:
        path = os.path.join(TMP_ROOT, f"{APP}-{uid}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        problem = _private_dir(path, uid, fix_mode=True)
        if problem is not None:
            raise RuntimeDirError(
                f"the embedded broker's runtime directory is unsafe: {problem}. Remove it, or set "
                "XDG_RUNTIME_DIR to a directory of your own with mode 0700"
            )
    return path


@dataclass(frozen=True)
class EmbeddedFiles:
    """The lock, log and pid file of the embedded broker at one address."""

    lock: str
    log: str
    pid: str

    def __iter__(self) -> Iterator[str]:
        return iter((self.lock, self.log, self.pid))


def _stem(address: str) -> str:
    """A readable stem (``tcp-127.0.0.1-5556``) plus a digest of the exact
    address, so that two addresses never share."""
    readable = re.sub(r"[^A-Za-z0-9.]+", "-", address).strip("-")[:60]
    digest = hashlib.sha1(address.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def files_for(address: str, directory: Optional[str] = None) -> EmbeddedFiles:
    """The lock, log and pid file for ``address`` in the runtime directory."""
    directory = runtime_dir() if directory is None else directory
    base = os.path.join(directory, _stem(address))
    return EmbeddedFiles(base + ".lock", base + ".log", base + ".pid")


def data_dir_for(address: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """Where the embedded broker at ``address`` keeps its durable task
    queues: ``$XDG_DATA_HOME/django-message-broker/<address>`` (by default
    ``~/.local/share/...``). Not the runtime directory: that one may be a
    tmpfs, emptied at every boot. Every project that shares the embedded
    broker at one address shares this directory, as it shares the broker."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "django-message-broker", _stem(address))


class HostLock:
    """An exclusive ``flock`` on the file ``path``, which may be unlinked by
    its holder: after taking it, ``acquire`` checks that the path still names
    the file it locked, and retries on the new file if not."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: Optional[float] = None) -> bool:
        """Take the lock; False if ``timeout`` seconds (0: one try) pass first."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: binding is the only guard
            self._fd = -1
            return True
        assert self._fd is None, "already held"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                locked = self._take(fcntl, fd, deadline)
            except BaseException:
                os.close(fd)
                raise
            if locked and _names(self.path, fd):
                self._fd = fd
                return True
            os.close(fd)
            if not locked:
                return False
            # the holder before us removed the file: lock the new one

    async def acquire_async(self, timeout: float) -> bool:
        """``acquire`` without blocking the event loop (a broker must keep
        answering the probe of whoever holds the lock while it waits)."""
        import asyncio

        deadline = time.monotonic() + timeout
        while not self.acquire(0):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None or fd < 0:
            return
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @staticmethod
    def _take(fcntl: Any, fd: int, deadline: Optional[float]) -> bool:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return True
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)


def _names(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def host_lock(path: str) -> Iterator[None]:
    """Hold ``HostLock(path)`` for the body."""
    lock = HostLock(path)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class PidFile:
    """The lock a broker holds on its pid file for as long as it runs (see
    the module docstring): ``close()`` it after removing the file, or let
    the process end."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: Optional[int] = fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock


def write_pid_file(path: str, address: str) -> PidFile:
    """Write ``<pid>\\n<address>\\n`` atomically (a reader never sees half),
    locked before it appears under ``path``; the returned ``PidFile`` holds
    the lock."""
    partial = f"{path}.{os.getpid()}.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # not inherited by children
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no sweep, no lock
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else has it
        os.write(fd, f"{os.getpid()}\n{address}\n".encode())
        os.replace(partial, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise
    return PidFile(path, fd)


def pid_file_held(path: str) -> Optional[bool]:
    """True if a running process holds the lock of the pid file ``path``;
    False if nobody does (the process that wrote it is gone); None if there
    is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _locked_by_another(fd)
    finally:
        os.close(fd)


def _locked_by_another(fd: int) -> bool:
    """True if another open file (this process's or another's) holds an
    ``flock`` on the file of ``fd``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: assume it runs
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def read_pid_file(path: str) -> Optional[int]:
    """The pid in ``path`` if the file exists and names a process that runs
    (not a zombie); else None."""
    try:
        with open(path) as handle:
            pid = int(handle.readline())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                # "pid (comm) state ...": comm may hold spaces and parentheses
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def remove_files(files: EmbeddedFiles, *, keep_log: bool = False) -> None:
    """Remove ``files`` (the caller holds the lock). The pid file only if it
    names this process: a broker removes no one else's."""
    try:
        with open(files.pid) as handle:
            mine = int(handle.readline()) == os.getpid()
    except (OSError, ValueError):
        mine = False
    # The lock goes last: once it is gone, a starter may lock a new one and
    # start a broker whose log and pid file must not be removed here.
    paths = ([files.pid] if mine else []) + ([] if keep_log else [files.log]) + [files.lock]
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# -- brokers that are gone ------------------------------------------------------------
@dataclass(frozen=True)
class RunningBroker:
    """An embedded broker of this user that runs (its pid file is locked)."""

    address: str
    pid: int
    files: EmbeddedFiles


def _stems(directory: str) -> tuple[list[str], list[str]]:
    """The address stems (paths without ``.lock``/``.log``/``.pid``) found in
    ``directory``, and its partial pid files (``<stem>.pid.<pid>.tmp``)."""
    stems: set[str] = set()
    partials = []
    for name in os.listdir(directory):
        if re.fullmatch(r".+\.pid\.\d+\.tmp", name):
            partials.append(os.path.join(directory, name))
            continue
        stem, ext = os.path.splitext(name)
        if ext in (".lock", ".log", ".pid") and stem:
            stems.add(os.path.join(directory, stem))
    return sorted(stems), sorted(partials)


def _of_stem(stem: str) -> EmbeddedFiles:
    return EmbeddedFiles(stem + ".lock", stem + ".log", stem + ".pid")


def _read_pid_and_address(path: str) -> tuple[Optional[int], str]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
        return int(lines[0]), lines[1] if len(lines) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None, ""


def running_brokers(directory: Optional[str] = None) -> list[RunningBroker]:
    """This user's embedded brokers that run (their pid file is locked)."""
    directory = runtime_dir() if directory is None else directory
    found = []
    for stem in _stems(directory)[0]:
        files = _of_stem(stem)
        if pid_file_held(files.pid):
            pid, address = _read_pid_and_address(files.pid)
            if pid is not None:
                found.append(RunningBroker(address, pid, files))
    return found


def sweep(directory: Optional[str] = None, *, now: Optional[float] = None, log_grace: float = LOG_GRACE) -> list[str]:
    """Remove the files of embedded brokers that are gone (see the module
    docstring) and return their paths. ``now`` is wall-clock time, as file
    times are (default ``time.time()``). A file that cannot be judged or
    removed is logged and left: housekeeping never stops a broker starting."""
    directory = runtime_dir() if directory is None else directory
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        stems, partials = _stems(directory)
    except OSError as exc:
        logger.warning("cannot sweep %s: %s", directory, exc)
        return removed
    for stem in stems:
        try:
            _sweep_address(_of_stem(stem), now, log_grace, removed)
        except OSError as exc:
            logger.warning("cannot sweep the files of %s: %s", stem, exc)
    for partial in partials:
        # half written by a process that is gone (its pid is in the name)
        if not pid_alive(int(partial.rsplit(".", 2)[1])) and _unlink(partial):
            removed.append(partial)
    if removed:
        logger.info("removed %d files of embedded brokers that are gone: %s", len(removed), ", ".join(removed))
    return removed


def _sweep_address(files: EmbeddedFiles, now: float, log_grace: float, removed: list[str]) -> None:
    had_lock = os.path.exists(files.lock)
    if not had_lock and not os.path.exists(files.pid) and not _log_expired(files.log, now, log_grace):
        return  # a recent log alone: nothing to remove, no need to lock
    lock = HostLock(files.lock)
    if not lock.acquire(0):
        return  # a starter, or a broker removing its own files: not gone
    try:
        gone = _sweep_locked(files, now, log_grace, removed)
        # We hold the lock, so nobody starts a broker here meanwhile. It goes
        # last (a waiter on it then locks a new file: see HostLock): if its
        # broker is gone, or if we made the file only to judge.
        if (gone or not had_lock) and _unlink(files.lock) and had_lock:
            removed.append(files.lock)
    finally:
        lock.release()


def _sweep_locked(files: EmbeddedFiles, now: float, log_grace: float, removed: list[str]) -> bool:
    """With the address's lock held: if its broker is gone, remove its pid
    file and (past the grace) its log, and return True; if it runs, remove
    nothing and return False."""
    try:
        fd = os.open(files.pid, os.O_RDONLY)
    except FileNotFoundError:
        pass
    else:
        try:
            if _locked_by_another(fd):
                return False  # it runs
            pid, _ = _read_pid_and_address(files.pid)
            if pid is not None and pid_alive(pid):
                # Unlocked, yet its process runs: a broker of a build that did
                # not lock its pid file, or a pid the system has given to
                # another process since. Keeping is the safe side.
                return False
            if _names(files.pid, fd) and _unlink(files.pid):
                removed.append(files.pid)
        finally:
            os.close(fd)
    if _log_expired(files.log, now, log_grace) and _unlink(files.log):
        removed.append(files.log)
    return True


def _log_expired(path: str, now: float, log_grace: float) -> bool:
    """True if the log ``path`` exists and was last written ``log_grace``
    seconds or more before ``now``."""
    try:
        return now - os.stat(path).st_mtime >= log_grace
    except FileNotFoundError:
        return False


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
