"""Where the embedded broker keeps its files (``_runtime.py``): one private
directory per user, not following TMPDIR; a lock that survives its file
being removed; pid files that name only live processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from django_message_broker import _runtime
from django_message_broker.__main__ import prog_name
from django_message_broker._runtime import (
    HostLock,
    RuntimeDirError,
    files_for,
    read_pid_file,
    remove_files,
    runtime_dir,
    write_pid_file,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX users and modes")

UID = os.getuid() if hasattr(os, "getuid") else 0


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """A stand-in for /tmp."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(_runtime, "TMP_ROOT", str(root))
    return root


def private(path) -> os.PathLike:
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    return path


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_xdg_runtime_dir_owned_by_the_user_is_used(tmp_path, tmp_root):
    xdg = private(tmp_path / "run-user")
    path = runtime_dir({"XDG_RUNTIME_DIR": str(xdg)})
    assert path == str(xdg / "django-message-broker")
    assert os.path.isdir(path) and mode(path) == 0o700
    assert os.listdir(tmp_root) == []


def test_without_xdg_it_is_a_private_dir_under_tmp(tmp_root):
    path = runtime_dir({})
    assert path == str(tmp_root / f"django-message-broker-{UID}")
    assert mode(path) == 0o700 and os.lstat(path).st_uid == UID


@pytest.mark.parametrize("problem", ["another user", "open to others", "relative", "missing", "a file"])
def test_an_unsafe_xdg_runtime_dir_falls_back_to_tmp(tmp_path, tmp_root, problem):
    xdg = tmp_path / "xdg"
    uid = UID
    if problem == "another user":
        private(xdg)
        uid = UID + 1  # as seen by another user, the directory is not theirs
    elif problem == "open to others":
        xdg.mkdir()
        os.chmod(xdg, 0o755)
    elif problem == "relative":
        xdg = "run/user"
    elif problem == "a file":
        xdg.write_text("")
    path = runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}, uid, create=False)
    assert path == str(tmp_root / f"django-message-broker-{uid}")


def test_it_does_not_follow_tmpdir(tmp_path, tmp_root, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    first = runtime_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    assert tempfile.gettempdir() == str(elsewhere)
    assert runtime_dir() == first
    assert files_for("tcp://127.0.0.1:5556").lock.startswith(first + os.sep)


def test_a_fallback_owned_by_another_user_is_refused(tmp_root):
    squatted = tmp_root / f"django-message-broker-{UID + 1}"
    private(squatted)  # made by "us", so not by the user UID + 1
    with pytest.raises(RuntimeDirError, match="owned by uid"):
        runtime_dir({}, UID + 1)


def test_a_fallback_that_is_a_symlink_is_refused(tmp_path, tmp_root):
    target = private(tmp_path / "target")
    os.symlink(target, tmp_root / f"django-message-broker-{UID}")
    with pytest.raises(RuntimeDirError, match="not a directory"):
        runtime_dir({})


def test_a_fallback_of_ours_open_to_others_is_closed(tmp_root):
    path = tmp_root / f"django-message-broker-{UID}"
    path.mkdir()
    os.chmod(path, 0o755)
    assert runtime_dir({}) == str(path)
    assert mode(path) == 0o700


def test_files_are_named_after_the_address(tmp_path):
    files = files_for("tcp://127.0.0.1:5556", str(tmp_path))
    assert os.path.basename(files.log).startswith("tcp-127.0.0.1-5556-")
    assert [os.path.splitext(path)[1] for path in files] == [".lock", ".log", ".pid"]
    assert all(os.path.dirname(path) == str(tmp_path) for path in files)
    other = files_for("tcp://127.0.0.1:55560", str(tmp_path))
    assert set(files).isdisjoint(other)
    assert files_for("ipc:///run/dmb.sock", str(tmp_path)).log != files_for("ipc:///run/dmb-sock", str(tmp_path)).log


# -- the lock ---------------------------------------------------------------------------
def test_the_lock_excludes_and_times_out(tmp_path):
    path = str(tmp_path / "x.lock")
    first, second = HostLock(path), HostLock(path)
    assert first.acquire(1)
    assert not second.acquire(0.1)
    first.release()
    assert second.acquire(0)
    second.release()


def test_a_waiter_takes_the_new_file_when_the_holder_removes_the_old(tmp_path):
    """The broker removes its lock file as its last step while holding it;
    a starter waiting on the old file must not think it holds the lock
    while a newcomer locks the new file."""
    path = str(tmp_path / "x.lock")
    holder = HostLock(path)
    assert holder.acquire(1)
    waiter = HostLock(path)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(waiter.acquire(10)))
    thread.start()
    os.unlink(path)
    holder.release()
    thread.join(10)
    assert result == [True]
    assert os.stat(path).st_ino == os.fstat(waiter._fd).st_ino  # type: ignore[arg-type]
    newcomer = HostLock(path)
    assert not newcomer.acquire(0)  # the waiter's lock is the one on the path
    waiter.release()
    assert newcomer.acquire(0)
    newcomer.release()


# -- pid files --------------------------------------------------------------------------
def test_a_pid_file_names_only_a_live_process(tmp_path):
    path = str(tmp_path / "x.pid")
    assert read_pid_file(path) is None
    write_pid_file(path, "tcp://127.0.0.1:1")
    assert read_pid_file(path) == os.getpid()
    with open(path) as handle:
        assert handle.read().splitlines() == [str(os.getpid()), "tcp://127.0.0.1:1"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    with open(path, "w") as handle:
        handle.write(f"{dead.pid}\n")
    assert read_pid_file(path) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        with open(path, "w") as handle:
            handle.write(f"{zombie.pid}\n")
        # exited but not yet reaped: not running
        assert _wait(lambda: read_pid_file(path) is None)
    finally:
        zombie.wait(10)
    with open(path, "w") as handle:
        handle.write("garbage\n")
    assert read_pid_file(path) is None


def _wait(predicate, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_remove_files_leaves_another_process_pid_file(tmp_path):
    files = files_for("tcp://127.0.0.1:1", str(tmp_path))
    for path in files:
        with open(path, "w") as handle:
            handle.write("1\n")  # pid 1 is not us
    remove_files(files)
    assert [os.path.exists(path) for path in files] == [False, False, True]
    write_pid_file(files.pid, "tcp://127.0.0.1:1")
    open(files.log, "w").close()
    remove_files(files, keep_log=True)
    assert [os.path.exists(path) for path in files] == [False, True, False]


# -- the console script's name ------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv0", "prog"),
    [
        ("/venv/bin/django-message-broker", "django-message-broker"),
        ("C:\\venv\\Scripts\\django-message-broker.exe".replace("\\", os.sep), "django-message-broker"),
        ("/src/django_message_broker/__main__.py", "python -m django_message_broker"),
        ("-c", "python -m django_message_broker"),
        ("", "python -m django_message_broker"),
    ],
)
def test_usage_names_the_command_as_it_was_run(argv0, prog):
    assert prog_name(argv0) == prog
