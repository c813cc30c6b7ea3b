"""The embedded default: one broker per host, started on first use.

``ensure_broker(address)`` returns at once if a broker answers there.
Otherwise it takes an OS file lock named after the address (so that of many
processes starting at once exactly one starts a broker), probes again, and
starts ``python -m django_message_broker serve`` as a detached process (its
own session: it outlives the process that started it). The broker exits by
itself after ``idle_timeout`` seconds with no clients and nothing queued.
Binding the address is the second guard: a broker that loses a race to
bind exits at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import zmq

from . import protocol as p
from .keys import client_curve
from .options import DEFAULT_MAX_MESSAGE_SIZE, is_local_address

__all__ = ["ensure_broker", "is_local_address", "probe"]

logger = logging.getLogger("django_message_broker.embedded")


def probe(address: str, timeout: float = 0.3, *, server_key: Any = None, client_key: Any = None) -> bool:
    """True if a broker answers a Hello at ``address`` within ``timeout``
    (with ``server_key``/``client_key``: over CURVE, see ``keys.client_curve``)."""
    curve = client_curve(server_key, client_key)
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    sock.setsockopt(zmq.ROUTING_ID, b"probe-" + uuid.uuid4().hex.encode())
    # A DEALER with no connected peer blocks on send (after a refused CURVE
    # handshake libzmq drops the pipe): never wait longer than the probe.
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
    try:
        sock.connect(address)
        sock.send_multipart([p.encode(p.Hello(1, "probe", 1.0))])
        if not sock.poll(int(timeout * 1000)):
            return False
        try:
            reply = p.decode_to_client(sock.recv_multipart()[0])
        except p.ProtocolError:
            return False
        sock.send_multipart([p.encode(p.Bye())])
        return isinstance(reply, p.Reply) and reply.code == 0
    except zmq.ZMQError:
        return False
    finally:
        sock.close(0)


def _paths(address: str) -> tuple[str, str]:
    digest = hashlib.sha1(address.encode()).hexdigest()[:16]
    base = os.path.join(tempfile.gettempdir(), f"django-message-broker-{digest}")
    return base + ".lock", base + ".log"


@contextmanager
def _host_lock(path: str) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: binding is the only guard
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_broker(
    address: str,
    *,
    idle_timeout: Optional[float] = 60.0,
    timeout: float = 10.0,
    max_body: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_memory: Optional[int] = None,
    server_key: Any = None,
    client_key: Any = None,
) -> bool:
    """Make a broker available at ``address`` (started with a body limit of
    ``max_body`` bytes, and ``max_memory`` bytes of queued messages if
    given, else the broker's default). Returns True if this call started it. Raises
    ``RuntimeError`` if it cannot. With ``server_key`` it only probes: an
    embedded broker has no secret key to serve CURVE."""
    if probe(address, server_key=server_key, client_key=client_key):
        return False
    if server_key:
        raise RuntimeError(
            f"no CURVE broker answers at {address} (or it refuses this client's key); "
            "an embedded broker is not started when server_key is set"
        )
    if not is_local_address(address):
        raise RuntimeError(
            f"no broker answers at {address}, and an embedded broker is only started for local addresses"
        )
    lock_path, log_path = _paths(address)
    with _host_lock(lock_path):
        if probe(address):
            return False
        command = [sys.executable, "-m", "django_message_broker", "serve", "--bind", address]
        command += ["--max-body", str(max_body)]
        if max_memory is not None:
            command += ["--max-memory", str(max_memory)]
        if idle_timeout is not None:
            command += ["--idle-timeout", str(idle_timeout)]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        logger.info("started an embedded broker (pid %d) on %s; log: %s", process.pid, address, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe(address, 0.2):
                return True
            if process.poll() is not None:
                if probe(address):  # lost a race to another host-level starter
                    return False
                raise RuntimeError(f"the embedded broker exited with status {process.returncode}; see {log_path}")
        raise RuntimeError(f"the embedded broker did not answer within {timeout}s; see {log_path}")
