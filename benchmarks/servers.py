"""The server processes a benchmark run owns: redis-server, our broker, the
bare pyzmq relay, and RabbitMQ for the Celery benchmark. Each is started on a free loopback port, waited for until
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
from typing import Callable, Optional, Sequence

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

    def __init__(
        self,
        name: str,
        command: list[str],
        ready: Callable[[], bool],
        *,
        timeout: float = 15.0,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.name = name
        self.command = command
        self.ready = ready
        self.timeout = timeout
        self.env = env
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
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env or child_env(),
                cwd=str(ROOT),
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


def redis_server(
    binary: str = "redis-server",
    directory: Optional[str] = None,
    appendfsync: Optional[str] = None,
    wrap: Sequence[str] = (),
) -> tuple[ServerProcess, int]:
    """``directory``: redis-server's working directory (it writes nothing
    there with the default options; the default is the repository).
    ``appendfsync`` (``always``, ``everysec``, ``no``): turn the append-only
    file on, in ``directory``, with that fsync policy. ``wrap``: a command
    the server runs under (``strace ...``; it must end the server when it
    ends itself)."""
    import redis

    port = free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else ["--appendonly", "no"]
    command = [*wrap, binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence]
    if directory:
        command += ["--dir", directory]

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


def broker_server(
    log_level: str = "WARNING",
    extra: Sequence[str] = (),
    module: str = "django_message_broker",
    wrap: Sequence[str] = (),
) -> tuple[ServerProcess, str]:
    """``extra``: more options for ``serve`` (``--data-dir``, ``--fsync``).
    ``module``: what ``python -m`` runs, a wrapper of ours with the same
    command line (``benchmarks.durable_broker``). ``wrap``: as for
    ``redis_server``."""
    from django_message_broker.embedded import probe

    address = f"tcp://127.0.0.1:{free_port()}"
    command = [*wrap, sys.executable, "-m", module, "serve", "--bind", address, "--log-level", log_level, *extra]
    return ServerProcess("broker", command, lambda: probe(address, 0.3)).start(), address


def relay_server() -> tuple[ServerProcess, str]:
    from .zmq_floor import relay_probe

    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "benchmarks.zmq_floor", address]
    return ServerProcess("zmq-relay", command, lambda: relay_probe(address, 0.3)).start(), address


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's; /usr/sbin's wrapper su's to rabbitmq
RABBITMQ_BIN = Path(RABBITMQ_SERVER).parent
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
#: The Erlang VM busy-waits for work by default, which burns the CPU that the
#: worker and the producer need on a small shared machine and counts as broker
#: CPU. RabbitMQ's docs advise turning it off there ("Runtime: CPU utilisation").
RABBITMQ_ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


def rabbitmq_missing() -> Optional[str]:
    """Why RabbitMQ cannot be started here, or ``None``."""
    if not os.path.exists(RABBITMQ_SERVER):
        return f"{RABBITMQ_SERVER} not found (apt-get install -y rabbitmq-server)"
    if not shutil.which("erl") and not os.path.exists("/usr/bin/erl"):
        return "erl not found"
    return None


class RabbitMQProcess(ServerProcess):
    """A throwaway RabbitMQ node: every port free and on loopback (AMQP, Erlang
    distribution, its own epmd, the CLI's), every file in a temporary
    directory, no plugins. Stopped with ``rabbitmqctl stop``, then killed; its
    epmd is stopped too and the directory removed."""

    def __init__(
        self,
        directory: str,
        node: str,
        amqp_port: int,
        epmd_port: int,
        env: dict[str, str],
        wrap: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.node = node
        self.amqp_port = amqp_port
        self.epmd_port = epmd_port

        def ready() -> bool:
            import amqp  # py-amqp, kombu's AMQP client: a full handshake and login

            conn = amqp.Connection(f"127.0.0.1:{amqp_port}", connect_timeout=1.0)
            try:
                conn.connect()
                return True
            except Exception:
                return False
            finally:
                try:
                    conn.collect()
                except Exception:
                    pass

        super().__init__("rabbitmq", [*wrap, RABBITMQ_SERVER], ready, timeout=60.0, env=env)

    def cpu_pids(self) -> list[int]:
        """The server's processes: the shell wrapper exec's into beam.smp,
        which has helpers (erl_child_setup, inet_gethost)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.Error:
            return []

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        assert self.env is not None
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.ctl("stop", timeout=30.0)
                self.process.wait(15)
            except (subprocess.TimeoutExpired, OSError):
                pass
        super().stop()
        self.kill_epmd()

    def kill_epmd(self) -> None:
        """Stop this node's epmd (it daemonizes, so stopping the node
        leaves it)."""
        try:
            subprocess.run(
                [EPMD, "-port", str(self.epmd_port), "-kill"],
                capture_output=True,
                timeout=10,
                check=False,
                env=self.env,
            )
        except (subprocess.TimeoutExpired, OSError):
            pass

    def remove_log(self) -> None:
        super().remove_log()
        shutil.rmtree(self.directory, ignore_errors=True)


def rabbitmq_server(parent: Optional[str] = None, wrap: Sequence[str] = ()) -> tuple[RabbitMQProcess, int]:
    """Start RabbitMQ on loopback; returns it and its AMQP port. Its files
    (the message store too) go in a new directory under ``parent`` (default:
    the system's temporary directory). ``wrap``: as for ``redis_server``."""
    directory = tempfile.mkdtemp(prefix="bench-rabbitmq-", dir=parent)
    amqp_port, dist_port, epmd_port, ctl_port = (free_port() for _ in range(4))
    node = f"bench-{os.getpid()}@localhost"
    conf = Path(directory, "rabbitmq.conf")
    conf.write_text(
        f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
        "log.console = false\n"
        "log.file.level = warning\n"
        "vm_memory_high_watermark.relative = 0.4\n"
        "disk_free_limit.absolute = 50MB\n"
    )
    Path(directory, "enabled_plugins").write_text("[].\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=directory,  # the Erlang cookie goes there, for the server and rabbitmqctl alike
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(amqp_port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_CTL_DIST_PORT_MIN=str(ctl_port),
        RABBITMQ_CTL_DIST_PORT_MAX=str(ctl_port),
        ERL_EPMD_PORT=str(epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_CONFIG_FILE=str(conf),
        RABBITMQ_CONF_ENV_FILE=str(Path(directory, "rabbitmq-env.conf")),  # absent: /etc's is not read
        RABBITMQ_ADVANCED_CONFIG_FILE=str(Path(directory, "advanced.config")),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(Path(directory, "enabled_plugins")),
        RABBITMQ_MNESIA_BASE=str(Path(directory, "mnesia")),
        RABBITMQ_LOG_BASE=str(Path(directory, "log")),
        RABBITMQ_PID_FILE=str(Path(directory, "rabbitmq.pid")),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=RABBITMQ_ERL_ARGS,
    )
    server = RabbitMQProcess(directory, node, amqp_port, epmd_port, env, wrap)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return server, amqp_port
