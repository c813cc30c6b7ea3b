"""What idle Celery workers cost the broker: N workers (Celery's defaults:
worker heartbeats every 2 s, gossip, mingle) connected to one broker, and
the broker's CPU time over a window, as a share of one core.

    python benchmarks/celery_idle.py [--workers 20] [--window 30]

Writes benchmarks/results/celery-idle-latest.md. The workers use the solo
pool: an idle prefork pool adds processes, not broker traffic.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

APP = """
import os
from celery import Celery
import django_message_broker.celery
app = Celery("idle", broker=os.environ["BROKER"])
app.conf.worker_hijack_root_logger = False
@app.task
def nothing():
    pass
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured once all workers are up")
    args = parser.parse_args()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen(
        [sys.executable, "-m", "django_message_broker", "serve", "--bind", address, "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    workers: list[subprocess.Popen] = []
    try:
        assert broker.stdout is not None
        broker.stdout.readline()  # "listening on ..."
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "idle_app.py").write_text(APP)
            env = dict(os.environ, BROKER=f"dmb://127.0.0.1:{port}", PYTHONPATH=tmp)
            for n in range(args.workers):
                workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "celery",
                            "-A",
                            "idle_app",
                            "worker",
                            "-P",
                            "solo",
                            "-n",
                            f"idle{n}@%h",
                            "-l",
                            "warning",
                        ],
                        cwd=tmp,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            sys.path.insert(0, tmp)
            os.environ.update(env)
            from idle_app import app  # type: ignore[import-not-found]

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                replies = app.control.inspect(timeout=1.0).ping() or {}
                if len(replies) >= args.workers:
                    break
            else:
                print(f"only {len(replies)} of {args.workers} workers answered", file=sys.stderr)
                return 1
            app.close()
            time.sleep(5)  # mingle and the first heartbeats settle
            proc = psutil.Process(broker.pid)
            before = proc.cpu_times()
            start = time.monotonic()
            time.sleep(args.window)
            after = proc.cpu_times()
            wall = time.monotonic() - start
        cpu = (after.user - before.user) + (after.system - before.system)
        share = 100.0 * cpu / wall
        line = (
            f"{args.workers} idle Celery workers (solo pool, Celery's default heartbeats and gossip): "
            f"the broker used {cpu:.3f} s of CPU in {wall:.1f} s = {share:.2f}% of one core"
        )
        print(line)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "celery-idle-latest.md").write_text(
            f"# Idle Celery workers\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
            f"with `python benchmarks/celery_idle.py --workers {args.workers} --window {args.window:g}`.\n\n"
            f"{line}.\n\nTarget (issue 11): under 5% of one core for 20 workers.\n"
        )
        return 0
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        broker.send_signal(signal.SIGTERM)
        broker.wait(20)


if __name__ == "__main__":
    sys.exit(main())
