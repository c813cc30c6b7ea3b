"""Helpers shared by the Django-integration tests (free ports, broker
processes, subprocesses with the test settings)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from helpers import free_port, wait_for  # noqa: F401 - re-exported for the django tests

HERE = Path(__file__).resolve().parent


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def listening(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def broker_processes(port: int) -> list[psutil.Process]:
    """Broker processes (``django_message_broker serve`` or ``runbroker``)
    with an argument naming exactly this port (``tcp://...:port``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info.get("cmdline") or []
        if not any(arg.endswith(f":{port}") and arg.split(":")[-1] == str(port) for arg in argv):
            continue
        cmdline = " ".join(argv)
        if "django_message_broker serve" in cmdline or "runbroker" in cmdline:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
    return found


def describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for proc in processes:
        try:
            cmdline = " ".join(proc.cmdline())
            out.append(f"pid {proc.pid} ppid {proc.ppid()} started {proc.create_time():.2f}: {cmdline}")
        except psutil.NoSuchProcess:
            out.append(f"pid {proc.pid} (gone)")
    return out


def django_env(**variables: Any) -> dict[str, str]:
    """The environment for a subprocess using tests/django/settings.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMB_TEST_")}
    env["DJANGO_SETTINGS_MODULE"] = "settings"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in variables.items()})
    return env


class Spawner:
    """Starts subprocesses and makes sure none outlives the test, nor any
    broker they may have started on the ports registered with ``watch_port``."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.ports: list[int] = []

    def __call__(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        process = subprocess.Popen(args, **kwargs)
        self.processes.append(process)
        return process

    def python(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        return self([sys.executable, *args], **kwargs)

    def watch_port(self, port: int) -> None:
        self.ports.append(port)

    def cleanup(self) -> list[str]:
        leftovers = []
        for process in self.processes:
            if process.poll() is None:
                leftovers.append(f"pid {process.pid}: {process.args!r}")
                process.kill()
            process.wait(10)
            for stream in (process.stdout, process.stderr, process.stdin):
                if stream is not None:
                    stream.close()
        for port in self.ports:
            for proc in broker_processes(port):
                leftovers.append(f"broker pid {proc.pid} on port {port}")
                try:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                except psutil.NoSuchProcess:
                    pass
        return leftovers


def run_manage_test(spawn: Any, label: str, settings: str, env: dict[str, str], timeout: float) -> str:
    """``python -m django test LABEL --settings=SETTINGS`` in this folder, in
    its own process group (killed if it outlives ``timeout``); returns its
    output once it has passed."""
    import pytest

    process = spawn.python(
        "-m", "django", "test", label, f"--settings={settings}", "--noinput", "-v", "2",
        cwd=HERE, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=10)
        pytest.fail(f"{label} did not finish in {timeout:g}s:\n{out.decode(errors='replace')}")
    text = str(out.decode(errors="replace"))
    assert process.returncode == 0, text
    return text
