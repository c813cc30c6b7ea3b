"""The floor: a bare asyncio pyzmq relay, no Django, no queues.

A ROUTER relay process forwards ``[destination id, payload]`` from one
DEALER client to another, reading every ready frame before it yields, like
our broker's read loop. ``ZmqFloorLayer`` gives it the few channel-layer
methods the cross-process scenarios use (``new_channel``, ``send``,
``receive``), with messages encoded by msgspec's msgpack. It has no
capacity, no expiry, no acknowledgements, no credit, no reconnection: it is
the cost of one Python hop through a relay, which no real layer can beat.

Run the relay: ``python -m benchmarks.zmq_floor tcp://127.0.0.1:PORT``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any, Optional

import msgspec
import zmq
import zmq.asyncio

_BATCH = 512
_REGISTER = b""  # a frame addressed to nobody: "hello, relay", answered with [b""]


async def relay(address: str) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    plain: zmq.Socket = zmq.Socket.shadow(sock.underlying)
    recv, send = plain.recv_multipart, plain.send_multipart
    dropped = 0
    print(f"zmq relay on {address}", flush=True)
    while True:
        await sock.poll()  # POLLIN
        for _ in range(_BATCH):
            try:
                frames = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(frames) != 3:
                continue
            source, dest, payload = frames
            try:
                if dest.bytes == _REGISTER:
                    send([source, b""], zmq.NOBLOCK)
                else:
                    send([dest, payload], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                dropped += 1
                if dropped in (1, 10, 100, 1000):
                    print(f"relay: {dropped} message(s) to unknown or busy peers dropped", flush=True)
        else:
            await asyncio.sleep(0)


def relay_probe(address: str, timeout: float = 0.3) -> bool:
    """True if a relay answers a registration at ``address``."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart([_REGISTER, b""])
        return bool(sock.poll(int(timeout * 1000)))
    finally:
        sock.close(0)


class ZmqFloorLayer:
    """The minimum a channel layer over the relay needs: one DEALER socket
    per instance (one event loop), a reader task that drains every ready
    frame and demultiplexes by channel name into local queues, and sends
    that never wait (no high-water mark). Channel names carry the receiving
    socket's id: ``prefix.<id>!<local>``."""

    extensions: list[str] = []

    def __init__(self, address: str, **_ignored: Any) -> None:
        self.address = address
        self.ident = "zf" + uuid.uuid4().hex[:16]
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._sock: Optional[zmq.asyncio.Socket] = None
        self._plain: Optional[zmq.Socket] = None
        self._reader: Optional[asyncio.Task] = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._registered: Optional[asyncio.Event] = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder().decode

    async def _connect(self) -> zmq.Socket:
        if self._plain is None:
            self._ctx = zmq.asyncio.Context()
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.ident.encode())
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(self.address)
            self._sock = sock
            self._plain = zmq.Socket.shadow(sock.underlying)
            self._registered = asyncio.Event()
            self._reader = asyncio.create_task(self._read())
            self._plain.send_multipart([_REGISTER, b""])
            await asyncio.wait_for(self._registered.wait(), 10)
        return self._plain

    async def _read(self) -> None:
        assert self._sock is not None and self._plain is not None and self._registered is not None
        poll, recv = self._sock.poll, self._plain.recv_multipart
        decode, queue = self._decode, self._queue
        while True:
            await poll()  # POLLIN
            while True:
                try:
                    frames = recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames == [b""]:
                    self._registered.set()
                    continue
                channel, message = decode(frames[-1])
                queue(channel).put_nowait(message)

    def _queue(self, channel: str) -> asyncio.Queue:
        queue = self._queues.get(channel)
        if queue is None:
            queue = self._queues[channel] = asyncio.Queue()
        return queue

    async def new_channel(self, prefix: str = "specific") -> str:
        await self._connect()
        return f"{prefix}.{self.ident}!{uuid.uuid4().hex[:12]}"

    async def send(self, channel: str, message: dict) -> None:
        sock = self._plain or await self._connect()
        dest = channel.split("!", 1)[0].rsplit(".", 1)[-1].encode()
        payload = self._encode((channel, message))
        sock.send_multipart([dest, payload], zmq.NOBLOCK, copy=len(payload) < 65536)

    async def receive(self, channel: str) -> dict:
        return await self._queue(channel).get()  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except BaseException:
                pass
        if self._sock is not None:
            self._sock.close()
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._plain = self._ctx = self._reader = None


if __name__ == "__main__":
    try:
        asyncio.run(relay(sys.argv[1]))
    except KeyboardInterrupt:
        pass
