"""The server processes a benchmark run owns: redis-server, our broker, the
bare pyzmq relay. Each is started on a free loopback port, waited for until
it answers, and stopped (SIGTERM, then SIGKILL) at the end. They are also
started under ``setpriv --pdeathsig`` where available, so that they die with
the harness even if it is killed outright.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
_SETPRIV = shutil.which("setpriv")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent exits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


#: Every server started and not yet stopped, for ``stop_all``.
_RUNNING: list[ServerProcess] = []


def stop_all(keep_logs: bool = False) -> list[str]:
    """Stop every server still running (also one interrupted while starting).
    Returns the paths of the logs kept."""
    kept = []
    for server in list(_RUNNING):
        server.stop()
        if keep_logs:
            kept.append(server.log_path)
        else:
            server.remove_log()
    return kept


class ServerProcess:
    """One long-running subprocess with a log file and a readiness check."""

    def __init__(self, name: str, command: list[str], ready: Callable[[], bool], *, timeout: float = 15.0) -> None:
        self.name = name
        self.command = command
        self.ready = ready
        self.timeout = timeout
        self.process: Optional[subprocess.Popen] = None
        handle, path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        os.close(handle)
        self.log_path = path

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServerProcess:
        command = self.command
        if _SETPRIV:
            command = [_SETPRIV, "--pdeathsig", "TERM", "--", *command]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=str(ROOT)
            )
        _RUNNING.append(self)
        try:
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}")
                if self.ready():
                    return self
                time.sleep(0.05)
            raise RuntimeError(f"{self.name} did not answer within {self.timeout}s:\n{self.log_tail()}")
        except BaseException:  # the error carries the log's tail
            self.stop()
            self.remove_log()
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def remove_log(self) -> None:
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def redis_server(binary: str = "redis-server") -> tuple[ServerProcess, int]:
    import redis

    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def ready() -> bool:
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    return ServerProcess("redis", command, ready).start(), port


def broker_server(log_level: str = "WARNING") -> tuple[ServerProcess, str]:
    from django_message_broker.embedded import probe

    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "django_message_broker", "serve", "--bind", address, "--log-level", log_level]
    return ServerProcess("broker", command, lambda: probe(address, 0.3)).start(), address


def relay_server() -> tuple[ServerProcess, str]:
    from .zmq_floor import relay_probe

    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "benchmarks.zmq_floor", address]
    return ServerProcess("zmq-relay", command, lambda: relay_probe(address, 0.3)).start(), address
