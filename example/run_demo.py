"""Run the demo chat site: two web server processes, a background worker and
a Celery worker, all on one embedded broker. ``make demo``, or::

    python example/run_demo.py [--host 127.0.0.1] [--ports 8000 8001] [--room lobby] [--interval 5]

Environment: ``DEMO_HOST``, ``DEMO_PORTS`` ("8000,8001"), ``DEMO_ROOM``,
``DEMO_INTERVAL`` set the defaults of those options, and ``DMB_ADDRESS`` the
broker address (default tcp://127.0.0.1:5556).

Nothing starts the broker explicitly: the first process that uses the
channel layer on this host starts one (the embedded default); here that is
this script, which sends itself one message before starting the servers so
that the broker is up when the addresses are printed. The broker outlives
the demo and exits by itself after a minute without clients.

Ctrl-C or SIGTERM stops every process this script started.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
STARTUP_TIMEOUT = 30.0  # seconds for the web servers to answer
STOP_TIMEOUT = 8.0  # seconds for the children to exit before SIGKILL

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description="Run the django-message-broker demo chat site.")
    parser.add_argument("--host", default=env.get("DEMO_HOST", "127.0.0.1"), help="interface of the web servers")
    parser.add_argument(
        "--ports",
        type=int,
        nargs=2,
        metavar=("PORT1", "PORT2"),
        default=[int(p) for p in env.get("DEMO_PORTS", "8000,8001").split(",")],
        help="ports of the two web servers (default 8000 8001)",
    )
    parser.add_argument("--room", default=env.get("DEMO_ROOM", "lobby"), help="room the background worker posts to")
    parser.add_argument(
        "--interval",
        type=float,
        default=float(env.get("DEMO_INTERVAL", "5")),
        help="seconds between the worker's posts (default 5)",
    )
    parser.add_argument("--address", default=env.get("DMB_ADDRESS"), help="broker address (default: the settings')")
    args = parser.parse_args(argv)
    if args.ports[0] == args.ports[1]:
        parser.error("the two ports must differ")
    return args


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


def warm_up() -> tuple[str, bool]:
    """Use the layer once (which starts the embedded broker if none answers).
    Returns the broker address and whether it was already running."""
    from django.conf import settings

    from django_message_broker import ProcessClient
    from django_message_broker.embedded import probe

    address = settings.CHANNEL_LAYERS["default"]["CONFIG"]["address"]
    running = probe(address)
    with ProcessClient() as client:
        channel = client.new_channel("demo")
        client.send(channel, {"type": "demo.warmup"})
        client.receive(channel, timeout=15)
    return address, running


class Child:
    """A child process in its own session, its output prefixed with its name."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script only; it stops the children in order
        )
        self._pump = threading.Thread(target=self._copy, args=(self.process.stdout,), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            say(f"[{self.name}] {raw.decode('utf-8', 'replace').rstrip()}")
        stream.close()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)  # the child and anything it started
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        try:
            self.process.wait(max(timeout, 0))
        except subprocess.TimeoutExpired:
            return False
        self._pump.join(2)
        return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def stop_all(children: list[Child]) -> None:
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        if not child.wait(deadline - time.monotonic()):
            say(f"[demo] {child.name} did not stop within {STOP_TIMEOUT}s: killing it")
            child.signal(signal.SIGKILL)
            child.wait(5)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    except AttributeError:
        pass
    for port in args.ports:
        if port_in_use(args.host, port):
            say(f"[demo] port {port} on {args.host} is in use: choose others with --ports or DEMO_PORTS")
            return 2

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if args.address:
        os.environ["DMB_ADDRESS"] = args.address
    os.environ["DJANGO_SETTINGS_MODULE"] = "chat.settings"
    urls = [f"http://{args.host}:{port}/" for port in args.ports]
    env = dict(os.environ, PYTHONUNBUFFERED="1", DEMO_SERVERS=",".join(u.rstrip("/") for u in urls))

    address, running = warm_up()
    say(f"[demo] broker at {address}: {'already running' if running else 'embedded broker started on first use'}")
    if not running:
        from django_message_broker._runtime import files_for

        say(
            f"[demo] its log: {files_for(address).log}; it exits by itself a minute after the demo stops, "
            f"or at once with: python -m django_message_broker stop --address {address}"
        )

    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    children: list[Child] = []
    try:
        for port in args.ports:
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "chat.asgi:application",
                "--app-dir",
                str(HERE),
                "--host",
                args.host,
                "--port",
                str(port),
                "--lifespan",
                "off",
                "--timeout-graceful-shutdown",
                "3",
            ]
            children.append(Child(f"web:{port}", command, env))
        worker = [sys.executable, str(HERE / "worker.py"), "--room", args.room, "--interval", str(args.interval)]
        children.append(Child("worker", worker, env))
        # Celery on the same broker (CELERY_BROKER_URL = "dmb://"): "/report" in a room runs a task.
        celery = [sys.executable, "-m", "celery", "-A", "chat", "worker", "-P", "prefork", "-c", "2", "-l", "info"]
        children.append(Child("celery", celery, dict(env, PYTHONPATH=str(HERE))))

        deadline = time.monotonic() + STARTUP_TIMEOUT
        pending = list(urls)
        while pending and not stopping.is_set():
            pending = [url for url in pending if not answers(url)]
            dead = [c for c in children if c.process.poll() is not None]
            if dead:
                say(f"[demo] {dead[0].name} exited with status {dead[0].process.returncode} during startup")
                return 1
            if pending and time.monotonic() > deadline:
                say(f"[demo] no answer from {', '.join(pending)} within {STARTUP_TIMEOUT}s")
                return 1
            if pending:
                stopping.wait(0.2)
        if stopping.is_set():
            return 0

        say(f"Demo running: {urls[0]} and {urls[1]} — both share the embedded broker; Ctrl-C to stop")
        say(
            f"[demo] broker {address}; the worker posts to room {args.room!r} every {args.interval:g}s "
            f"(open {urls[0]}room/{args.room}/ and {urls[1]}room/{args.room}/); "
            "type /report in a room to run a Celery task that answers there"
        )
        while not stopping.wait(0.5):
            dead = [c for c in children if c.process.poll() is not None]
            if dead:
                say(f"[demo] {dead[0].name} exited with status {dead[0].process.returncode}: stopping the demo")
                return 1
        return 0
    finally:
        if children:
            say("[demo] stopping...")
            stop_all(children)
            say("[demo] stopped")


if __name__ == "__main__":
    sys.exit(main())
