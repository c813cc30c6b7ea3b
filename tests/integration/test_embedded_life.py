"""The embedded broker's life, with real processes: its files live in the
per-user runtime directory and go when it exits (idle or stopped); ``stop``
stops it; a broker that cannot bind says what holds the address; two
processes with different TMPDIR share one broker; ``--help`` names the
command as it was run.

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

from django_message_broker._runtime import files_for, read_pid_file, runtime_dir
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
