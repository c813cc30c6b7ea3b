"""The embedded default: one broker per host, started on first use.

``ensure_broker(address)`` returns at once if a broker answers there.
Otherwise it takes an OS file lock named after the address (so that of many
processes starting at once exactly one starts a broker), probes again, and
starts ``python -m django_message_broker serve`` as a detached process (its
own session: it outlives the process that started it). The broker exits by
itself after ``idle_timeout`` seconds with no clients and nothing queued.
Binding the address is the second guard: a broker that loses a race to
bind exits at once.

Its files (lock, log, pid) live in one per-user runtime directory (see
``_runtime.py``) and are removed when it exits normally: ``serve
--embedded`` runs ``serve_embedded``, which writes the pid file once bound
and, at exit, takes the lock before it closes its socket, so a starter
waiting on the lock never sees a half-removed set. The broker holds a lock
on its pid file while it runs; the files of a broker that died without
removing them (SIGKILL) are swept (``_runtime.sweep``) by the next broker
to start and by a client before it starts one. ``stop_embedded`` (the
``stop`` command) signals it through its pid file, ``status`` lists the
brokers that run; ``address_in_use_hint`` tells a ``runbroker`` that fails
to bind what holds the address.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Optional

import zmq

from . import protocol as p
from ._runtime import (
    HostLock,
    RunningBroker,
    data_dir_for,
    files_for,
    host_lock,
    read_pid_file,
    remove_files,
    running_brokers,
    runtime_dir,
    sweep,
    write_pid_file,
)
from .keys import client_curve
from .options import DEFAULT_MAX_MESSAGE_SIZE, is_local_address

__all__ = [
    "address_in_use_hint",
    "ensure_broker",
    "is_local_address",
    "probe",
    "serve_embedded",
    "status_embedded",
    "stop_embedded",
]

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
    files = files_for(address)
    log_path = files.log
    sweep(os.path.dirname(files.lock))  # what brokers killed before us left
    with host_lock(files.lock):
        if probe(address):
            return False
        command = [sys.executable, "-m", "django_message_broker", "serve", "--embedded", "--bind", address]
        command += ["--data-dir", data_dir_for(address)]  # durable task queues (Celery's) survive a restart
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


async def serve_embedded(address: str, **options: Any) -> None:
    """Run the broker as the embedded broker for ``address`` (``serve
    --embedded``, which ``ensure_broker`` starts): like ``serve``, plus the
    pid file, and the files removed at a normal exit (the log is kept if the
    broker failed). A broker that cannot bind touches no file."""
    from .server.server import BrokerServer, run_until_stopped, stop_on_signals

    files = files_for(address)  # a bad runtime directory fails before binding
    data_dir = options.get("data_dir")
    if data_dir is not None:
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
        except OSError as exc:  # no home directory to write in: still serve, in memory
            logger.warning("cannot use %s for durable queues (%s): they are kept in memory only", data_dir, exc)
            options["data_dir"] = None
    server = BrokerServer(address, **options)
    stop = stop_on_signals()  # before the pid file: whoever sees it may signal us at once
    pid_files: list[Any] = []
    # The pid file (locked while we run) before the first answer: a starter
    # that sees this broker answer finds it.
    await server.start(on_bound=lambda: pid_files.append(write_pid_file(files.pid, address)))
    failed = True
    pid_file = pid_files[0]
    try:
        sweep(os.path.dirname(files.pid))  # what brokers killed before us left
        await run_until_stopped(server, stop)
        failed = False
    finally:
        # Take the lock before closing the socket: a starter holding it
        # probes this broker, which must still answer (the loop runs while
        # we wait), and once we have it no new broker can start here until
        # the files are gone.
        lock = HostLock(files.lock)
        locked = await lock.acquire_async(timeout=15)
        try:
            await server.stop()
            if locked:
                remove_files(files, keep_log=failed)
            else:
                logger.warning("could not take %s within 15s: leaving the embedded broker's files", files.lock)
        finally:
            lock.release()
            if pid_file is not None:
                pid_file.close()  # after the removal: until then, a sweep sees us running


def stop_embedded(address: str, *, timeout: float = 10.0) -> tuple[bool, str]:
    """Stop this user's embedded broker at ``address`` (SIGTERM, through its
    pid file) and wait until it has exited. Returns (success, what to tell
    the user)."""
    files = files_for(address)
    pid = read_pid_file(files.pid)
    if pid is None:
        if probe(address):
            return False, (
                f"a broker answers at {address}, but not an embedded broker of this user (no pid file in "
                f"{os.path.dirname(files.pid)}): stop it the way it was started (its process manager, or Ctrl-C)"
            )
        return True, f"no broker runs at {address}: nothing to stop" + _others(address)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True, f"no broker runs at {address}: nothing to stop" + _others(address)
    deadline = time.monotonic() + timeout
    while read_pid_file(files.pid) == pid:
        if time.monotonic() >= deadline:
            return False, f"the embedded broker (pid {pid}) at {address} did not exit within {timeout:g}s"
        time.sleep(0.05)
    return True, f"stopped the embedded broker (pid {pid}) at {address}"


def _others(address: str) -> str:
    """What else runs, for a ``stop`` that found nothing at ``address``."""
    others = [b for b in running_brokers() if b.address != address]
    if not others:
        return ""
    return "; this user's embedded brokers run at " + ", ".join(f"{b.address} (pid {b.pid})" for b in others)


def status_embedded(*, probe_timeout: float = 0.3) -> tuple[str, list[tuple[RunningBroker, bool]], list[str]]:
    """Sweep this user's runtime directory, then list the embedded brokers
    that run there, each with whether it answers a probe. Returns (the
    directory, [(broker, answers)], the paths the sweep removed)."""
    directory = runtime_dir()
    removed = sweep(directory)
    brokers = running_brokers(directory)
    return directory, [(b, probe(b.address, probe_timeout)) for b in brokers], removed


def address_in_use_hint(address: str) -> str:
    """What holds ``address`` (for a bind that failed with EADDRINUSE), and
    how to stop it."""
    try:
        files = files_for(address)
    except RuntimeError:
        files = None
    pid = read_pid_file(files.pid) if files is not None else None
    if files is not None and pid is not None:
        return (
            f"the embedded broker (pid {pid}, started by a client with embedded=True; log: {files.log}) serves "
            f"{address}. Stop it with `python -m django_message_broker stop --address {address}` and set "
            '"embedded": False in the clients\' CONFIG, or they start it again when your broker is down'
        )
    if probe(address):
        return (
            f"another django-message-broker broker answers at {address} (a runbroker or serve, or another user's "
            "embedded broker): stop it where it was started, or bind another address"
        )
    return f"another program uses {address}"
