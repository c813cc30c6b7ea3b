"""``python -m django_message_broker serve [--bind ADDR]``: run the broker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional, Sequence

import zmq

from .server.broker import DEFAULT_MAX_BODY
from .server.server import DEFAULT_ADDRESS, serve


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m django_message_broker", description="django-message-broker")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the broker in the foreground")
    run.add_argument(
        "--bind", default=DEFAULT_ADDRESS, help=f"address to bind (default {DEFAULT_ADDRESS}; ipc:// accepted)"
    )
    run.add_argument(
        "--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest message body in bytes (default 16 MiB)"
    )
    run.add_argument("--max-queue-length", type=int, default=None, help="hard cap on any one channel's queue")
    run.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="exit after this many idle seconds (no clients, nothing queued)",
    )
    run.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(
            serve(
                args.bind,
                max_body=args.max_body,
                max_queue_length=args.max_queue_length,
                idle_timeout=args.idle_timeout,
            )
        )
    except (OSError, zmq.ZMQError) as exc:  # address in use, bad address
        print(f"cannot serve on {args.bind}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
