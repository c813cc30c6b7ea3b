"""Helpers for the reliability suite (imported by its conftest and tests):
real broker processes on free ports, worker processes (``_worker.py``),
deadline polling. Every broker and worker a test starts through the
fixtures is killed at teardown (by pid)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil
import pytest

from helpers import wait_for  # noqa: F401 - re-exported for the reliability tests

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"

#: Client options used by every fault test: quick to notice a dead broker.
FAST = {"timeout": 1.0, "heartbeat": 0.2}

SOAK = os.environ.get("DMB_SOAK") == "1"
soak = pytest.mark.skipif(not SOAK, reason="soak test: runs only with DMB_SOAK=1 (make soak)")


# -- polling ---------------------------------------------------------------------
async def await_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """``wait_for`` for async predicates (``predicate()`` returns an awaitable)."""
    import asyncio

    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = await predicate()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")
        await asyncio.sleep(interval)


def free_tcp_address() -> str:
    """A loopback address with a port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# -- broker processes -------------------------------------------------------------
class BrokerProcess:
    """``python -m django_message_broker serve`` as a child process. Its
    stdout and stderr (the log) go to one file."""

    def __init__(self, address: str, log_dir: Path, args: tuple[str, ...] = ()) -> None:
        self.requested = address
        self.args = args
        self.log_path = log_dir / f"broker-{time.monotonic_ns()}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.address = ""

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        command = [sys.executable, "-m", "django_message_broker", "serve", "--bind", self.requested, *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (\S+)", self.log())
            if match and "django-message-broker listening" in self.log():
                self.address = match.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"broker did not start within {timeout}s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def num_fds(self) -> int:
        return self.ps.num_fds()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit status."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def log_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dmb-reliability-") as d:
        yield Path(d)


@pytest.fixture
def broker_proc(log_dir: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """``broker_proc(address="tcp://127.0.0.1:0", *args)``: a started broker
    process; every one is SIGKILLed at teardown."""
    started: list[BrokerProcess] = []

    def start(address: str = "tcp://127.0.0.1:0", *args: str, timeout: float = 20.0) -> BrokerProcess:
        broker = BrokerProcess(address, log_dir, tuple(args))
        started.append(broker)
        return broker.start(timeout)

    yield start
    for broker in started:
        try:
            broker.kill()
        except Exception:
            pass


# -- worker processes -------------------------------------------------------------
class Worker:
    """A ``_worker.py`` child: JSON commands on stdin, JSON lines on stdout."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self.err_path = log_dir / f"worker-{time.monotonic_ns()}.err"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self._pending = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the worker (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while "\n" not in self._pending:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {self.pid} said nothing within {timeout}s; stderr:\n{self.stderr()[-3000:]}"
                )
            try:
                chunk = self.proc.stdout.read()  # type: ignore[union-attr]
            except (BlockingIOError, TypeError):
                chunk = None
            if chunk:
                self._pending += chunk
                continue
            if self.proc.poll() is not None and not chunk:
                raise AssertionError(
                    f"worker {self.pid} exited ({self.proc.returncode}); stderr:\n{self.stderr()[-3000:]}"
                )
            time.sleep(0.01)
        line, self._pending = self._pending.split("\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, timeout: float = 30.0, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.read(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except Exception:
                pass
        self._err.close()


@pytest.fixture
def workers(log_dir: Path) -> Iterator[Callable[..., Worker]]:
    """``workers(*args)``: start ``_worker.py``; all are killed at teardown."""
    started: list[Worker] = []

    def start(*args: str) -> Worker:
        worker = Worker([str(a) for a in args], log_dir)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.close()
        except Exception:
            pass


def processes_serving(address: str) -> list[psutil.Process]:
    """Broker processes whose command line binds exactly ``address``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "django_message_broker" in cmdline and "serve" in cmdline and address in cmdline:
            found.append(proc)
    return found


class GoodClient:
    """A well-behaved client doing round trips (send, then receive the same
    message) on ``channel`` in a thread, while a test throws bad input at
    the broker: ``latencies`` and ``errors`` say how it fared."""

    def __init__(self, client: Any, channel: str, pause: float = 0.005) -> None:
        self.client = client  # a SyncClient, closed on exit
        self.channel = channel
        self.pause = pause
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-client", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            body = b"rt:%d" % n
            start = time.monotonic()
            try:
                self.client.send(self.channel, body)
                got = self.client.receive(self.channel, timeout=10)
                if got != body:
                    self.errors.append(f"expected {body!r}, got {got!r}")
            except Exception as exc:
                self.errors.append(repr(exc))
            self.latencies.append(time.monotonic() - start)
            n += 1
            time.sleep(self.pause)

    def __enter__(self) -> GoodClient:
        assert self.client.wait_connected(10), "the good client did not connect"
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(20)
        self.client.close()
