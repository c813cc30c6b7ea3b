"""Where the embedded broker keeps its files (``_runtime.py``): one private
directory per user, not following TMPDIR; a lock that survives its file
being removed; pid files that name only live processes and are locked while
their broker runs; the sweep of the files of brokers that are gone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from django_message_broker import _runtime
from django_message_broker.__main__ import prog_name
from django_message_broker._runtime import (
    LOG_GRACE,
    HostLock,
    RuntimeDirError,
    files_for,
    pid_file_held,
    read_pid_file,
    remove_files,
    running_brokers,
    runtime_dir,
    sweep,
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
    write_pid_file(path, "tcp://127.0.0.1:1").close()
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
    write_pid_file(files.pid, "tcp://127.0.0.1:1").close()
    open(files.log, "w").close()
    remove_files(files, keep_log=True)
    assert [os.path.exists(path) for path in files] == [False, True, False]


# -- the pid file's lock, and the sweep ---------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid


def leftovers(directory, address: str, pid: int, *, age: float = 0.0):
    """The files a broker at ``address`` with ``pid`` leaves when killed
    (an unlocked pid file), its log last written ``age`` seconds ago."""
    files = files_for(address, str(directory))
    for path in files:
        with open(path, "w") as handle:
            handle.write(f"{pid}\n{address}\n" if path == files.pid else "")
    if age:
        os.utime(files.log, (time.time() - age, time.time() - age))
    return files


def existing(files) -> list[str]:
    return [os.path.splitext(path)[1] for path in files if os.path.exists(path)]


def test_a_pid_file_is_locked_from_before_it_appears_until_closed(tmp_path):
    path = str(tmp_path / "x.pid")
    assert pid_file_held(path) is None
    pid_file = write_pid_file(path, "tcp://127.0.0.1:1")
    assert pid_file_held(path) is True
    assert os.listdir(tmp_path) == ["x.pid"]  # no partial file left
    pid_file.close()
    assert pid_file_held(path) is False
    pid_file.close()  # twice is fine


def test_the_sweep_removes_a_dead_brokers_lock_and_pid_at_once_and_its_log_after_the_grace(tmp_path):
    files = leftovers(tmp_path, "tcp://127.0.0.1:1", dead_pid())
    now = time.time()
    assert sorted(sweep(str(tmp_path), now=now)) == sorted([files.lock, files.pid])
    assert existing(files) == [".log"]
    assert sweep(str(tmp_path), now=now + LOG_GRACE - 60) == []
    assert sweep(str(tmp_path), now=now + LOG_GRACE + 1) == [files.log]
    assert os.listdir(tmp_path) == []


def test_the_sweep_removes_a_failed_brokers_old_log_and_lone_locks(tmp_path):
    """A broker that failed at start keeps its log (no pid file); a starter
    that died leaves its lock file."""
    failed = files_for("tcp://127.0.0.1:2", str(tmp_path))
    open(failed.log, "w").close()
    os.utime(failed.log, (time.time() - LOG_GRACE - 5,) * 2)
    recent = files_for("tcp://127.0.0.1:3", str(tmp_path))
    open(recent.log, "w").close()
    lone = files_for("tcp://127.0.0.1:4", str(tmp_path))
    open(lone.lock, "w").close()
    assert sorted(sweep(str(tmp_path))) == sorted([failed.log, lone.lock])
    assert os.listdir(tmp_path) == [os.path.basename(recent.log)]


def test_the_sweep_keeps_every_file_of_a_broker_whose_pid_file_is_locked(tmp_path):
    """The lock decides, not the pid: here the pid file names a dead pid
    (as if the system had recycled it), yet its lock is held."""
    files = leftovers(tmp_path, "tcp://127.0.0.1:1", os.getpid(), age=LOG_GRACE + 60)
    pid_file = write_pid_file(files.pid, "tcp://127.0.0.1:1")
    with open(files.pid, "w") as handle:  # the same (locked) file, another pid
        handle.write(f"{dead_pid()}\ntcp://127.0.0.1:1\n")
    try:
        assert sweep(str(tmp_path), now=time.time() + 10 * LOG_GRACE) == []
        assert existing(files) == [".lock", ".log", ".pid"]
        assert [(b.address, b.files) for b in running_brokers(str(tmp_path))] == [("tcp://127.0.0.1:1", files)]
    finally:
        pid_file.close()
    assert running_brokers(str(tmp_path)) == []
    assert len(sweep(str(tmp_path))) == 3


def test_the_sweep_leaves_an_address_whose_lock_is_held(tmp_path):
    """A starter holds the lock while its broker starts: not gone."""
    files = leftovers(tmp_path, "tcp://127.0.0.1:1", dead_pid(), age=LOG_GRACE + 60)
    starter = HostLock(files.lock)
    assert starter.acquire(0)
    try:
        assert sweep(str(tmp_path)) == []
        assert existing(files) == [".lock", ".log", ".pid"]
    finally:
        starter.release()
    assert len(sweep(str(tmp_path))) == 3


def test_the_sweep_keeps_an_unlocked_pid_file_whose_process_runs(tmp_path):
    """A broker of a build that did not lock its pid file: the pid check
    only ever keeps files, never removes them."""
    files = leftovers(tmp_path, "tcp://127.0.0.1:1", os.getpid(), age=LOG_GRACE + 60)
    assert sweep(str(tmp_path)) == []
    assert existing(files) == [".lock", ".log", ".pid"]


def test_the_sweep_removes_partial_pid_files_of_dead_writers_only(tmp_path):
    files = files_for("tcp://127.0.0.1:1", str(tmp_path))
    dead = f"{files.pid}.{dead_pid()}.tmp"
    mine = f"{files.pid}.{os.getpid()}.tmp"
    other = tmp_path / "notes.txt"
    for path in (dead, mine, other):
        open(path, "w").close()
    assert sweep(str(tmp_path)) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), "notes.txt"])


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
