"""Helpers for the kombu transport's tests and real Celery workers.

Workers are ``celery worker`` subprocesses (prefork) running the app in
``celery_app.py`` against a real broker on a free loopback port; tasks
leave their traces in files under the test's ``tmp_path`` (``Traces``), so
a test waits on what it expects, never on a fixed sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import wait_for

HERE = Path(__file__).resolve().parent


def dmb_url(address: str) -> str:
    return "dmb://" + address.split("://", 1)[1]


class Traces:
    """Lines that tasks append to files in one directory (one file per
    name): what ran, in which process, when."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> str:
        return str(self.directory / f"{name}.log")

    def lines(self, name: str) -> list[str]:
        try:
            return (self.directory / f"{name}.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait(self, name: str, count: int, timeout: float = 20.0) -> list[str]:
        wait_for(lambda: len(self.lines(name)) >= count, timeout, f"{count} line(s) in {name}.log")
        return self.lines(name)


class Worker:
    """A ``celery worker`` subprocess in its own process group."""

    def __init__(self, broker_url: str, name: str, log: Path, *args: str, backend: str = "rpc://", env: Any = None):
        self.name = name
        self.log = log
        command = [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "-P", "prefork", "-c", "2", "-l", "info", "-n", name, *args,
        ]  # fmt: skip
        environ = dict(os.environ, PYTHONPATH=str(HERE), BROKER=broker_url, BACKEND=backend, **(env or {}))
        self.process = subprocess.Popen(
            command, cwd=HERE, env=environ, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, app: Any, timeout: float = 30.0) -> None:
        def answers() -> bool:
            assert self.process.poll() is None, f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}"
            replies = app.control.inspect(destination=[self.name], limit=1, timeout=0.5).ping()
            return bool(replies and self.name in replies)

        wait_for(answers, timeout, f"worker {self.name} answers ping")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def stop(self, timeout: float = 45.0) -> int:
        """Warm shutdown (SIGTERM), as a process manager does. Celery's
        prefork pool may take up to 30 s: a pool process waits that long for
        the main process to read its last results (billiard's
        ``_ensure_messages_consumed``; seen with the Redis transport too)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


def elapsed(since: float) -> float:
    return time.monotonic() - since
