"""A client process for the reliability tests (not a test module).

    python _worker.py ADDRESS [--prefetch N] [--timeout S] [--heartbeat S] [--embedded]

It reads JSON commands from stdin, one a line, and answers each with one JSON
line on stdout. Message bodies are ``b"TAG:SEQ"``. Commands:

``listen``   {"channels": [...], "log": path|null, "delay": s}: a receive loop
             per channel. Each message is checked against the last one of its
             ``(channel, TAG)``: SEQ must be the last plus one (kept order, no
             duplicates). With ``log`` every message is appended to that file
             (one ``os.write`` each, so a SIGKILL loses nothing that was
             received). ``delay``: seconds to sleep after each message.
``report``   totals and, per ``channel TAG``, ``[count, last seq]``, plus the
             order violations seen.
``group_add`` {"group", "channel"}
``produce``  {"channels": [...], "count": N, "tag": T, "capacity": C}: send N
             messages round robin over the channels, then a ``stats`` round
             trip (so every pipelined send has been handled by the broker);
             its error, if any, is ``final_stats_error``.
``stream``   {"channel", "tag", "log", "interval", "capacity"}: send until ``halt``,
             appending ``SEQ ok|ErrorType T_START T_END`` per attempt to
             ``log`` (monotonic times; every attempt has its own SEQ).
``halt``     stop streaming; answers with the stream's counts.
``stats``    the broker's stats.
``stop``     close the client and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Optional

from django_message_broker import AsyncClient, BrokerError


class _Counter(logging.Handler):
    """Counts the client's 'refused a pipelined message' / 'dropped' errors."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.refused = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "refused" in text:
            self.refused += 1
        elif "dropped" in text:
            self.dropped += 1


class Worker:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.tasks: list[asyncio.Task] = []
        self.keys: dict[str, list[int]] = {}  # "channel TAG" -> [count, last seq]
        self.violations: list[str] = []
        self.received = 0
        self.log_fds: dict[str, int] = {}
        self.stream_task: Optional[asyncio.Task] = None
        self.stream_counts: dict[str, int] = {}
        self.counter = _Counter()
        logging.getLogger("django_message_broker").addHandler(self.counter)

    # -- receiving ---------------------------------------------------------
    async def _receive_loop(self, channel: str, fd: Optional[int], delay: float) -> None:
        receive = self.client.receive
        keys = self.keys
        while True:
            body = await receive(channel)
            if fd is not None:
                os.write(fd, b"%s %s %f\n" % (channel.encode(), body, time.monotonic()))
            self.received += 1
            tag, _, seq_text = body.decode().rpartition(":")
            seq = int(seq_text)
            key = f"{channel} {tag}"
            state = keys.get(key)
            if state is None:
                state = keys[key] = [0, -1]
            if seq != state[1] + 1 and len(self.violations) < 50:
                self.violations.append(f"{key}: {seq} after {state[1]}")
            state[0] += 1
            state[1] = max(state[1], seq)
            if delay:
                await asyncio.sleep(delay)

    def listen(self, channels: list[str], log: Optional[str], delay: float = 0.0) -> dict[str, Any]:
        fd = None
        if log:
            fd = self.log_fds.get(log)
            if fd is None:
                fd = self.log_fds[log] = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for channel in channels:
            self.tasks.append(asyncio.ensure_future(self._receive_loop(channel, fd, delay)))
        return {"listening": len(channels)}

    def report(self) -> dict[str, Any]:
        failed = [repr(t.exception()) for t in self.tasks if t.done() and not t.cancelled() and t.exception()]
        return {"received": self.received, "keys": self.keys, "violations": self.violations, "failed": failed}

    # -- sending -----------------------------------------------------------
    async def produce(
        self, channels: list[str], count: int, tag: str, capacity: int, ttl: float = 300.0
    ) -> dict[str, Any]:
        send = self.client.send
        seqs = dict.fromkeys(channels, 0)
        errors: dict[str, int] = {}
        refused_before = self.counter.refused
        started = time.monotonic()
        n = len(channels)
        for i in range(count):
            channel = channels[i % n]
            seq = seqs[channel]
            try:
                await send(channel, b"%s:%d" % (tag.encode(), seq), ttl=ttl, capacity=capacity)
                seqs[channel] = seq + 1
            except BrokerError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if i % 2000 == 1999:
                await asyncio.sleep(0)
        sent_in = time.monotonic() - started
        final_error = None
        try:
            await self.client.stats()  # every pipelined send before it has been handled
        except BrokerError as exc:
            final_error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.05)  # let a late refusal reply be logged
        return {
            "send_loop_s": sent_in,
            "final_stats_error": final_error,
            "sent": sum(seqs.values()),
            "per_channel": seqs,
            "errors": errors,
            "refused": self.counter.refused - refused_before,
            "elapsed": time.monotonic() - started,
        }

    async def _stream(self, channel: str, tag: str, log: str, interval: float, capacity: int) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        counts = self.stream_counts
        seq = 0
        try:
            while True:
                start = time.monotonic()
                try:
                    await self.client.send(channel, b"%s:%d" % (tag.encode(), seq), ttl=300.0, capacity=capacity)
                    status = "ok"
                except BrokerError as exc:
                    status = type(exc).__name__
                end = time.monotonic()
                counts[status] = counts.get(status, 0) + 1
                os.write(fd, b"%d %s %f %f\n" % (seq, status.encode(), start, end))
                seq += 1  # one id per attempt: a failed send that was in fact accepted is no "duplicate"
                await asyncio.sleep(interval)
        finally:
            os.close(fd)

    def stream(self, channel: str, tag: str, log: str, interval: float, capacity: int = 100) -> dict[str, Any]:
        self.stream_task = asyncio.ensure_future(self._stream(channel, tag, log, interval, capacity))
        return {"streaming": channel}

    async def halt(self) -> dict[str, Any]:
        task, self.stream_task = self.stream_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return {"counts": self.stream_counts, "dropped": self.counter.dropped, "refused": self.counter.refused}

    # -- dispatch ----------------------------------------------------------
    async def handle(self, command: dict[str, Any]) -> Optional[dict[str, Any]]:
        op = command.pop("op")
        if op == "listen":
            return self.listen(**command)
        if op == "report":
            return self.report()
        if op == "group_add":
            await self.client.group_add(command["group"], command["channel"])
            return {"ok": True}
        if op == "produce":
            return await self.produce(**command)
        if op == "stream":
            return self.stream(**command)
        if op == "halt":
            return await self.halt()
        if op == "stats":
            return await self.client.stats()
        if op == "connected":
            return {"connected": self.client.wait_connected(command.get("timeout", 10.0))}
        if op == "stop":
            for task in self.tasks:
                task.cancel()
            await self.halt()
            self.client.close()
            return None
        raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--heartbeat", type=float, default=0.2)
    parser.add_argument("--idle-return", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    client = AsyncClient(
        args.address,
        timeout=args.timeout,
        heartbeat=args.heartbeat,
        prefetch=args.prefetch,
        idle_return=args.idle_return,
    )
    worker = Worker(client)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while True:
        line = await commands.get()
        if line is None:
            break
        command = json.loads(line)
        stop = command.get("op") == "stop"
        try:
            answer = await worker.handle(command)
        except Exception as exc:
            answer = {"error": type(exc).__name__, "detail": str(exc)}
        if stop:
            print(json.dumps({"stopped": True}), flush=True)
            return
        print(json.dumps(answer), flush=True)
    client.close()


if __name__ == "__main__":
    asyncio.run(main())
