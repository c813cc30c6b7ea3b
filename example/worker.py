"""A background worker: posts "worker: tick N" to a chat room every few seconds.

    python example/worker.py [--room lobby] [--interval 5]

It is a plain process (no ASGI server, no event loop): ``ProcessClient``
reads the broker address from the demo's settings (``DMB_ADDRESS``), and the
posts reach every browser in the room, whichever web server it is on.
Stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")

import django  # noqa: E402
from django_message_broker import BrokerError, ProcessClient  # noqa: E402

logger = logging.getLogger("chat.worker")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--room", default=os.environ.get("DEMO_ROOM", "lobby"), help="room to post to (default lobby)")
    parser.add_argument(
        "--interval",
        type=float,
        default=float(os.environ.get("DEMO_INTERVAL", "5")),
        help="seconds between posts",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")

    django.setup()  # settings, logging; ProcessClient() reads CHANNEL_LAYERS["default"]
    from chat.rooms import group_name

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    group = group_name(args.room)
    tick = 0
    with ProcessClient() as client:
        logger.info("worker: posting to %s every %ss via %s", group, args.interval, client.options.address)
        while not stop.is_set():
            tick += 1
            try:
                delivered, skipped = client.group_send(
                    group, {"type": "chat.message", "text": f"worker: tick {tick}", "user": "worker"}
                )
            except BrokerError as exc:  # broker restarting: try again next tick
                logger.warning("worker: tick %d not posted: %s", tick, exc)
            else:
                logger.info(
                    "worker: tick %d -> %d member(s) of %s%s",
                    tick,
                    delivered,
                    group,
                    f" ({skipped} full, skipped)" if skipped else "",
                )
            stop.wait(args.interval)
    logger.info("worker: stopped after %d tick(s)", tick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
