"""The embedded broker's life, with real processes: its files live in the
per-user runtime directory and go when it exits (idle or stopped); ``stop``
stops it; a broker that cannot bind says what holds the address; two
processes with different TMPDIR share one broker; ``--help`` names the
command as it was run; the files of a SIGKILLed broker are swept by the next
start, never those of a broker that runs; ``status`` lists what runs.

Every test points XDG_RUNTIME_DIR at its own directory (the brokers it
starts inherit it) and kills, at teardown, any broker a pid file there names.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from django_message_broker._runtime import LOG_GRACE, files_for, pid_alive, read_pid_file, runtime_dir, sweep
from django_message_broker.embedded import ensure_broker, probe

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX: pid files, signals, modes"),
    pytest.mark.timeout(60),
]


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "django_message_broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """This test's runtime directory; brokers left running are killed."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    directory = Path(runtime_dir())
    yield directory
    for pid_file in directory.glob("*.pid"):
        pid = read_pid_file(str(pid_file))
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def test_files_are_in_the_runtime_dir_and_stop_removes_them(runtime):
    address = free_address()
    files = files_for(address)
    assert ensure_broker(address, idle_timeout=60) is True
    assert all(Path(path).parent == runtime for path in files)
    pid = read_pid_file(files.pid)
    assert pid is not None and pid != os.getpid()
    with open(files.pid) as handle:
        assert handle.read().split() == [str(pid), address]
    assert "listening on" in Path(files.log).read_text()

    result = run("stop", "--address", address)
    assert result.returncode == 0, result
    assert f"stopped the embedded broker (pid {pid})" in result.stdout
    assert not probe(address, 0.3)
    assert [p for p in files if os.path.exists(p)] == []
    # stopping again: nothing to stop, and that is fine
    again = run("stop", "--address", address)
    assert (again.returncode, "nothing to stop" in again.stdout) == (0, True), again


def test_an_idle_broker_exits_and_removes_its_files(runtime):
    address = free_address()
    files = files_for(address)
    assert ensure_broker(address, idle_timeout=0.5) is True
    pid = read_pid_file(files.pid)
    assert pid is not None
    assert wait_for(lambda: not probe(address, 0.1), 15), "the idle broker still answers"
    assert wait_for(lambda: not any(os.path.exists(p) for p in files), 10), [p for p in files if os.path.exists(p)]
    assert list(runtime.iterdir()) == []


def test_processes_with_different_tmpdir_share_one_broker(runtime, tmp_path):
    address = free_address()
    script = "import sys; from django_message_broker.embedded import ensure_broker; print(ensure_broker(sys.argv[1]))"
    started = []
    for name in ("a", "b"):
        tmpdir = tmp_path / f"tmp-{name}"
        tmpdir.mkdir()
        env = {**os.environ, "TMPDIR": str(tmpdir)}
        result = subprocess.run(
            [sys.executable, "-c", script, address], capture_output=True, text=True, timeout=30, env=env
        )
        assert result.returncode == 0, result
        started.append(result.stdout.strip())
        assert list(tmpdir.iterdir()) == []
    assert started == ["True", "False"]  # the second found the first's broker
    assert run("stop", "--address", address).returncode == 0


def test_serve_on_the_embedded_brokers_address_names_it_and_how_to_stop_it(runtime):
    address = free_address()
    assert ensure_broker(address, idle_timeout=60) is True
    pid = read_pid_file(files_for(address).pid)
    result = run("serve", "--bind", address)
    assert result.returncode == 1
    assert f"cannot serve on {address}" in result.stderr
    assert f"the embedded broker (pid {pid}" in result.stderr
    assert f"python -m django_message_broker stop --address {address}" in result.stderr
    assert probe(address)  # unharmed, and its files are still there
    assert read_pid_file(files_for(address).pid) == pid
    assert run("stop", "--address", address).returncode == 0


def test_serve_on_another_brokers_address_says_so(runtime, broker):
    result = run("serve", "--bind", broker.address)
    assert result.returncode == 1
    assert "another django-message-broker broker answers" in result.stderr, result.stderr
    stop = run("stop", "--address", broker.address)
    assert stop.returncode == 1
    assert "not an embedded broker of this user" in stop.stderr
    assert probe(broker.address)


def test_serve_on_an_address_another_program_holds_says_so(runtime):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        result = run("serve", "--bind", address)
    assert result.returncode == 1
    assert f"another program uses {address}" in result.stderr, result.stderr


def test_a_broker_that_loses_the_bind_leaves_the_winners_files(runtime):
    address = free_address()
    assert ensure_broker(address, idle_timeout=60) is True
    files = files_for(address)
    before = {p: os.stat(p).st_ino for p in files}
    lost = run("serve", "--embedded", "--bind", address)
    assert lost.returncode == 1
    assert {p: os.stat(p).st_ino for p in files} == before
    assert run("stop", "--address", address).returncode == 0


# -- brokers killed without cleaning up ---------------------------------------------------
def kill_embedded(address: str) -> int:
    """SIGKILL the embedded broker at ``address``; return its pid once it is
    dead (a zombie of this process counts as dead, see pid_alive)."""
    pid = read_pid_file(files_for(address).pid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(pid), 10), f"pid {pid} survived SIGKILL"
    assert wait_for(lambda: not probe(address, 0.1), 10)
    return pid


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid


def present(files) -> list[str]:
    return [os.path.splitext(p)[1] for p in files if os.path.exists(p)]


def test_the_next_start_sweeps_a_killed_brokers_files_and_status_lists_what_runs(runtime):
    killed, live = free_address(), free_address()
    assert ensure_broker(killed, idle_timeout=60) is True
    old_pid = kill_embedded(killed)
    gone = files_for(killed)
    assert present(gone) == [".lock", ".log", ".pid"]  # what SIGKILL leaves

    assert ensure_broker(live, idle_timeout=60) is True  # the next start, at another address
    kept = files_for(live)
    # its lock and pid file went at once; its log stays for LOG_GRACE, to be read
    assert present(gone) == [".log"]
    assert "listening on" in Path(gone.log).read_text()
    assert present(kept) == [".lock", ".log", ".pid"]

    status = run("status")
    assert status.returncode == 0, status
    live_pid = read_pid_file(kept.pid)
    lines = [line for line in status.stdout.splitlines() if line.startswith("tcp://")]
    assert lines == [f"{live}  pid {live_pid}  serving  log: {kept.log}"], status.stdout
    assert f"runtime directory: {runtime}" in status.stdout
    assert str(old_pid) not in status.stdout

    # Past the grace the dead broker's log goes too; the live broker's files
    # stay however old they are: its pid file is locked.
    assert sweep(now=time.time() + LOG_GRACE + 1) == [gone.log]
    assert present(kept) == [".lock", ".log", ".pid"]
    assert probe(live)
    stop = run("stop", "--address", killed)  # nothing there: it says what runs
    assert stop.returncode == 0 and f"{live} (pid {live_pid})" in stop.stdout, stop
    assert run("stop", "--address", live).returncode == 0
    assert list(runtime.iterdir()) == []
    assert "no embedded broker of this user runs" in run("status").stdout


def test_a_restart_at_the_killed_brokers_address_takes_over_its_files(runtime):
    address = free_address()
    assert ensure_broker(address, idle_timeout=60) is True
    old_pid = kill_embedded(address)
    assert ensure_broker(address, idle_timeout=60) is True
    files = files_for(address)
    new_pid = read_pid_file(files.pid)
    assert new_pid not in (None, old_pid)
    # the new broker appends to the old broker's log
    assert Path(files.log).read_text().count("django-message-broker listening on") == 2
    assert run("stop", "--address", address).returncode == 0
    assert present(files) == []


def serve_by_hand(address: str) -> subprocess.Popen:
    """``serve --embedded`` run directly (no starter, no lock file), its
    output in the address's log."""
    with open(files_for(address).log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "django_message_broker", "serve", "--embedded", "--bind", address],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_a_sigkilled_broker_started_by_hand_is_swept_by_the_next_broker(runtime):
    """``serve --embedded`` run directly (no starter, no lock file): the next
    embedded broker to start sweeps what it left."""
    address = free_address()
    files = files_for(address)
    process = serve_by_hand(address)
    try:
        assert wait_for(lambda: read_pid_file(files.pid) == process.pid, 15), Path(files.log).read_text()
        process.kill()
        process.wait(10)
        assert present(files) == [".log", ".pid"]
        other = free_address()
        second = serve_by_hand(other)
        try:
            assert wait_for(lambda: read_pid_file(files_for(other).pid) == second.pid, 15)
            assert wait_for(lambda: present(files) == [".log"], 10), present(files)
        finally:
            second.terminate()
            assert second.wait(15) == 0
        assert present(files_for(other)) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_sweep_never_removes_a_live_brokers_files(runtime):
    """Sweeps in a loop, in another process, while brokers start and stop:
    each broker's pid file and log are there for as long as it runs, and
    stop finds it."""
    # In another process: in this one the sweep's locks would be the test's own.
    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from django_message_broker._runtime import sweep\n"
            "deadline = time.monotonic() + 50\n"
            "while time.monotonic() < deadline:\n"
            "    sweep()\n",
        ],
    )
    try:
        # leftovers of a dead broker: once they are gone, the sweeper is at work
        dead = files_for(free_address())
        for path in (dead.lock, dead.pid):
            Path(path).write_text(f"{dead_pid()}\n")
        assert wait_for(lambda: present(dead) == [], 20), "the sweeper does not sweep"
        for _ in range(3):
            address = free_address()
            files = files_for(address)
            assert ensure_broker(address, idle_timeout=60) is True
            pid = read_pid_file(files.pid)
            assert pid is not None
            for _ in range(20):  # the sweeper runs meanwhile
                assert present(files)[-2:] == [".log", ".pid"], present(files)
                assert probe(address, 0.5)
            result = run("stop", "--address", address)
            assert f"stopped the embedded broker (pid {pid})" in result.stdout, result
        assert busy.poll() is None, "the sweeper died"
    finally:
        busy.kill()
        busy.wait(10)


def test_help_names_the_command_as_it_was_run():
    as_module = run("--help")
    assert as_module.stdout.startswith("usage: python -m django_message_broker "), as_module.stdout
    script = Path(sys.executable).parent / "django-message-broker"
    if not script.exists():
        pytest.skip("the console script is not installed next to this Python")
    as_script = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert as_script.stdout.startswith("usage: django-message-broker serve "), as_script.stdout


def test_every_command_line_option_has_help():
    from django_message_broker.__main__ import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_sigterm_as_soon_as_the_pid_file_is_there_stops_cleanly(runtime):
    """Whoever sees an embedded broker's pid file may signal it at once
    (``stop``, a process manager): it stops as it would later, exit status
    0 and its files gone, never by the signal's default action. Its signal
    handlers come before the pid file."""
    for _ in range(5):
        address = free_address()
        files = files_for(address)
        process = serve_by_hand(address)
        try:
            deadline = time.monotonic() + 15
            while read_pid_file(files.pid) != process.pid:  # no sleep: signal the moment it appears
                assert time.monotonic() < deadline and process.poll() is None, Path(files.log).read_text()
            process.terminate()
            assert process.wait(15) == 0, Path(files.log).read_text()
            assert wait_for(lambda files=files: present(files) == [], 10), present(files)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
