"""End to end: the demo (example/run_demo.py) as a user runs it.

Two uvicorn processes and the background worker on an embedded broker that
the demo starts on first use, at a fresh address; real websocket clients on
both servers in one room. Checks that chat messages cross between the two
server processes both ways, that the worker's posts reach both, that the
pages are served, and that stopping the demo leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

psutil = pytest.importorskip("psutil")
websockets = pytest.importorskip("websockets")
pytest.importorskip("uvicorn")
pytest.importorskip("channels")

try:
    from websockets.asyncio.client import connect
except ImportError:  # websockets < 13
    from websockets import connect  # type: ignore[no-redef]

from helpers import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUN_DEMO = ROOT / "example" / "run_demo.py"
ROOM = "e2e"


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Demo:
    """run_demo.py in a subprocess; its output collected line by line."""

    def __init__(self, ports: list[int], address: str) -> None:
        self.ports = ports
        self.address = address
        env = dict(os.environ, DMB_ADDRESS=address, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
        command = [sys.executable, str(RUN_DEMO), "--ports", *map(str, ports), "--room", ROOM, "--interval", "0.5"]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line starting {prefix!r} within {timeout}s; output:\n" + self.output())
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                status = self.process.wait()
                raise AssertionError(f"the demo exited ({status}) before {prefix!r}; output:\n" + self.output())
            if line.startswith(prefix):
                return line

    def output(self) -> str:
        return "\n".join(self.lines[-80:])


def broker_processes(address: str) -> list[Any]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "django_message_broker" in cmdline and "serve" in cmdline and address in cmdline:
            found.append(proc)
    return found


def demo_processes(address: str) -> list[Any]:
    """Every process but the broker that runs with this test's DMB_ADDRESS
    (the demo passes its environment on): children, grandchildren, orphans."""
    brokers = {proc.pid for proc in broker_processes(address)}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in brokers and proc.environ().get("DMB_ADDRESS") == address:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


class ChatClient:
    """A websocket in the room; every message it receives is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._task: Optional[asyncio.Task[None]] = None
        self.ws: Any = None

    async def __aenter__(self) -> ChatClient:
        origin = f"http://127.0.0.1:{self.port}"
        url = f"ws://127.0.0.1:{self.port}/ws/chat/{ROOM}/"
        self.ws = await connect(url, origin=origin, open_timeout=10)  # type: ignore[arg-type]
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        async for raw in self.ws:
            self.messages.append(json.loads(raw))
            self._arrived.set()

    async def send(self, text: str, user: str) -> None:
        await self.ws.send(json.dumps({"text": text, "user": user}))

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = self.messages[-10:]
                raise AssertionError(f"client on :{self.port}: no matching message within {timeout}s; last: {last}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def is_chat(text: str, user: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m == {"type": "chat.message", "text": text, "user": user}


def is_tick(message: dict[str, Any]) -> bool:
    return message.get("user") == "worker" and str(message.get("text", "")).startswith("worker: tick ")


@pytest.mark.timeout(45)  # about 8 s here
async def test_demo_two_servers_share_the_embedded_broker() -> None:
    port1, port2, broker_port = free_ports(3)
    address = f"tcp://127.0.0.1:{broker_port}"
    assert not broker_processes(address)
    demo = Demo([port1, port2], address)
    children: list[Any] = []
    try:
        banner = await asyncio.to_thread(demo.wait_for_line, "Demo running:", 30)
        assert f"http://127.0.0.1:{port1}/" in banner and f"http://127.0.0.1:{port2}/" in banner

        # The embedded broker: started on first use, exactly one for the address.
        brokers = broker_processes(address)
        assert len(brokers) == 1, brokers
        broker_pid = brokers[0].pid
        parent = psutil.Process(demo.process.pid)
        children = [c for c in parent.children(recursive=True) if c.pid != broker_pid]
        commands = [" ".join(c.cmdline()) for c in children]
        assert sum("uvicorn" in c for c in commands) == 2, commands
        assert sum("worker.py" in c for c in commands) == 1, commands
        direct = [" ".join(c.cmdline()) for c in parent.children() if c.pid != broker_pid]
        assert sum("celery -A chat worker" in c for c in direct) == 1, direct  # and its pool processes

        # The leak detector used at the end sees them all (and not the broker).
        # Celery's pool forks its processes while it starts: compare until both views agree.
        def same_processes() -> bool:
            nonlocal children
            children = [c for c in parent.children(recursive=True) if c.pid != broker_pid]
            return {c.pid for c in children} | {demo.process.pid} == {p.pid for p in demo_processes(address)}

        await asyncio.to_thread(wait_for, same_processes, 10.0, "the leak detector to see every demo process")

        # The pages, from both servers.
        for port in (port1, port2):
            status, html = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/")
            assert status == 200 and 'id="room-form"' in html
            status, html = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/room/{ROOM}/")
            assert status == 200
            for part in ('id="chat-log"', 'id="chat-form"', 'id="chat-text"', "new WebSocket(", "/ws/chat/"):
                assert part in html, part
            assert "<script src=" not in html  # no CDN, no build step: the JS is inline

        async with ChatClient(port1) as one, ChatClient(port2) as two:
            # Server 1 -> server 2, and back: only the broker connects the processes.
            await one.send("hello from one", "alice")
            await two.wait_for(is_chat("hello from one", "alice"))
            await one.wait_for(is_chat("hello from one", "alice"))  # the sender is in the group too
            await two.send("hello from two", "bob")
            await one.wait_for(is_chat("hello from two", "bob"))
            await two.wait_for(is_chat("hello from two", "bob"))

            # The background worker's posts reach clients on both servers.
            tick1 = await one.wait_for(is_tick)
            tick2 = await two.wait_for(is_tick)
            # ... and the same posts: a later tick seen on one is seen on the other.
            later = await one.wait_for(lambda m: is_tick(m) and m != tick1 and m != tick2)
            await two.wait_for(lambda m: m == later)

            # "/report" runs a Celery task on the same broker; its answer reaches both servers.
            await one.send("/report", "carol")
            report = await two.wait_for(lambda m: m.get("user") == "celery" and "report for carol" in m["text"])
            await one.wait_for(lambda m: m == report)
    finally:
        if demo.process.poll() is None:
            demo.process.send_signal(signal.SIGINT)  # Ctrl-C
        returncode: Optional[int] = None
        try:
            returncode = await asyncio.to_thread(demo.process.wait, 20)
        except subprocess.TimeoutExpired:
            demo.process.kill()
            demo.process.wait(5)
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 5)
        stray = [p for p in demo_processes(address) if p.pid != demo.process.pid and p.is_running()]
        for proc in alive + stray:
            proc.kill()
        for broker in broker_processes(address):
            broker.kill()
            await asyncio.to_thread(broker.wait, 5)

    assert returncode == 0, demo.output()
    assert not alive, f"children left running after the demo stopped: {alive}"
    assert not stray, f"demo processes left running: {stray}"
    assert "[demo] stopped" in demo.lines, demo.output()
    assert not any("did not stop" in line for line in demo.lines), demo.output()
