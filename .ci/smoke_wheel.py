"""The built wheel as a user gets it. Run by .ci/smoke_wheel.sh with the
Python of a fresh venv that holds only the wheel (and its django extra),
from a directory outside the checkout. Checks: the package comes from that
venv; the console script and ``python -m`` answer ``--help`` under their own
names; a message makes a round trip through an embedded broker that the
first client starts, via SyncClient and via ProcessClient; once the clients
close, that broker exits by itself and removes its files. Nothing is left
running: a broker still there at the end is killed, and the check fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time


def check(condition: object, message: str) -> None:
    if not condition:
        print(f"smoke: FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main() -> None:
    import django_message_broker as dmb

    where = os.path.realpath(dmb.__file__)
    check(where.startswith(os.path.realpath(sys.prefix) + os.sep), f"imported from {where}, not from {sys.prefix}")
    check("site-packages" in where, f"not an installed package: {where}")
    print(f"smoke: django-message-broker {dmb.__version__} from {os.path.dirname(where)}")

    bindir = os.path.dirname(sys.executable)
    script = os.path.join(bindir, "django-message-broker")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    check(out.returncode == 0 and out.stdout.startswith("usage: django-message-broker "), out.stdout + out.stderr)
    out = subprocess.run([sys.executable, "-m", "django_message_broker", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    check(out.stdout.startswith("usage: python -m django_message_broker serve"), out.stdout + out.stderr)
    print("smoke: console script and python -m answer --help")

    from django_message_broker import ChannelsServerLayer, ProcessClient, SyncClient  # noqa: F401
    from django_message_broker._runtime import files_for, read_pid_file
    from django_message_broker.embedded import probe

    with tempfile.TemporaryDirectory(prefix="dmb-smoke-") as scratch:
        address = f"ipc://{scratch}/broker.sock"
        files = files_for(address)
        pid = None
        try:
            client = SyncClient(address, embedded=True, embedded_idle_timeout=1.0, timeout=20)
            try:
                client.send("smoke", b"hello")
                check(client.receive("smoke", timeout=20) == b"hello", "SyncClient round trip")
                pid = read_pid_file(files.pid)
                check(pid is not None and pid != os.getpid(), f"no embedded broker pid in {files.pid}")
                with ProcessClient(address=address, embedded=True, embedded_idle_timeout=1.0) as worker:
                    worker.send("smoke-dict", {"type": "smoke.message", "n": 1})
                    check(worker.receive("smoke-dict", timeout=20) == {"type": "smoke.message", "n": 1}, "ProcessClient")
            finally:
                client.close()
            print(f"smoke: round trips through the embedded broker (pid {pid}) on {address}")
            gone = wait_for(lambda: read_pid_file(files.pid) is None and not probe(address, 0.1), 30)
            check(gone, f"the embedded broker (pid {pid}) did not exit within 30s of going idle")
            left = [path for path in files if os.path.exists(path)]
            check(not left, f"the embedded broker left {left}")
            print("smoke: the idle broker exited and removed its files")
        finally:
            stray = read_pid_file(files.pid) or (pid if pid and _alive(pid) else None)
            if stray is not None:
                os.kill(stray, signal.SIGKILL)
                print(f"smoke: killed the embedded broker (pid {stray}) left running", file=sys.stderr)
    print("smoke: ok")


def _alive(pid: int) -> bool:
    from django_message_broker._runtime import pid_alive

    return pid_alive(pid)


if __name__ == "__main__":
    main()
