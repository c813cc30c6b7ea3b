"""``python -m django_message_broker serve [--bind ADDR]``: run the broker.
``python -m django_message_broker stop [--address ADDR]``: stop the embedded broker.
``python -m django_message_broker status``: list this user's embedded brokers.
``python -m django_message_broker stats [--address ADDR] [--watch] [--json]``: a broker's stats.
``python -m django_message_broker keygen NAME``: create a CURVE key pair.
The same as the ``django-message-broker`` console script."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
from typing import Any, Optional, Sequence

import zmq

from ._memory import parse_size
from .embedded import address_in_use_hint, serve_embedded, status_embedded, stop_embedded
from .metrics import MetricsError, require_prometheus
from .server.broker import DEFAULT_MAX_BODY
from .server.server import DEFAULT_ADDRESS, check_bind, serve
from .server.store import FSYNC_MODES

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _mode(text: str) -> int:
    """An octal file mode such as 0660."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a file mode: {text!r}")
    return mode


def _size(text: str) -> int:
    """A byte size: 268435456, 256MB, 1GiB."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def prog_name(argv0: Optional[str] = None) -> str:
    """How the user ran us, for ``usage:``: the console script's name, or
    ``python -m django_message_broker`` (``sys.argv[0]`` is then this file)."""
    name = os.path.basename(sys.argv[0] if argv0 is None and sys.argv else argv0 or "")
    if name.endswith(".exe"):
        name = name[: -len(".exe")]
    if name.startswith("django-message-broker"):
        return name
    return "python -m django_message_broker"


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function so that tests can read every option)."""
    parser = argparse.ArgumentParser(
        prog=prog_name(),
        description="django-message-broker: run the broker, list or stop the embedded ones, show a broker's stats, "
        "make CURVE keys",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the broker in the foreground")
    run.add_argument(
        "--bind", default=DEFAULT_ADDRESS, help=f"address to bind (default {DEFAULT_ADDRESS}; ipc:// accepted)"
    )
    run.add_argument(
        "--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest message body in bytes (default 16 MiB)"
    )
    run.add_argument(
        "--max-queue-length",
        type=int,
        default=None,
        help="hard cap on any one channel's queue, in messages (default: none)",
    )
    run.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        help="bytes of queued messages the broker holds at most, broker-wide; past it sends are refused "
        "(e.g. 268435456, 256MB, 1GiB; default: a quarter of the host's physical memory)",
    )
    run.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="exit after this many idle seconds (no clients, nothing queued; default: never)",
    )
    run.add_argument("--secret-key", default=None, help="the broker's secret certificate: encrypt with CURVE")
    run.add_argument(
        "--authorized-keys",
        default=None,
        help="directory of the clients' public certificates: only they may connect (re-read on SIGHUP)",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback TCP address without --secret-key (plain text, anyone may connect)",
    )
    run.add_argument(
        "--ipc-mode",
        type=_mode,
        default=None,
        help="file mode of an ipc:// socket, e.g. 0660 (default: as the umask leaves it)",
    )
    run.add_argument(
        "--data-dir",
        default=None,
        help="keep durable task queues (Celery's) in this directory, so they survive a restart "
        "(default: in memory only; docs/durability.md)",
    )
    run.add_argument(
        "--fsync",
        default="always",
        choices=FSYNC_MODES,
        help="with --data-dir: always (a confirmed publish is on disk; the default), everysec "
        "(a machine crash loses up to a second) or off",
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"log messages of this level and above: {', '.join(LOG_LEVELS)} (default INFO)",
    )
    add_metrics_arguments(run)
    run.add_argument(
        "--embedded",
        action="store_true",
        help="run as the embedded broker (clients with embedded=True start it so): write a pid file in the "
        "runtime directory, and remove its lock, log and pid files at exit",
    )
    stop = commands.add_parser("stop", help="stop this user's embedded broker at an address, and wait for it")
    stop.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"the address it serves, as in CONFIG (default {DEFAULT_ADDRESS})"
    )
    stop.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for it to exit (default 10)")
    commands.add_parser(
        "status",
        help="list this user's embedded brokers (address, pid, log), after removing the files of those killed "
        "without cleaning up",
    )
    stats = commands.add_parser("stats", help="show a broker's stats: channels, clients, rates (top-like)")
    stats.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"the broker's address (default {DEFAULT_ADDRESS})"
    )
    add_stats_arguments(stats)
    stats.add_argument("--server-key", default=None, help="CURVE: the broker's public certificate (file or Z85 text)")
    stats.add_argument("--client-key", default=None, help="CURVE: this client's secret certificate file")
    keygen = commands.add_parser("keygen", help="create a CURVE key pair: NAME.key and NAME.key_secret")
    keygen.add_argument("name", help="file name stem, e.g. broker or web-1")
    keygen.add_argument("--dir", "-d", default=".", help="output directory (default: the current one)")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0 to 65535; 0: any free one)")
    return port


def _top(text: str) -> int:
    try:
        top = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if top < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return top


def add_metrics_arguments(parser: Any) -> None:
    """``--metrics-port`` and ``--metrics-host`` (``serve`` and ``runbroker``)."""
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics on this port at /metrics (needs the 'metrics' extra; default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=None,
        help="address the metrics endpoint binds (default 127.0.0.1: loopback only)",
    )


def add_stats_arguments(parser: Any) -> None:
    """The options ``stats`` and ``manage.py brokerstats`` share (but the address)."""
    parser.add_argument("--watch", "-w", action="store_true", help="refresh every second until Ctrl-C, like top")
    parser.add_argument(
        "--json", action="store_true", help="print JSON for scripts (with --watch: one object per line)"
    )
    parser.add_argument("--top", type=_top, default=20, help="how many channels and clients to list (default 20)")
    parser.add_argument(
        "--count", "-n", type=_top, default=None, help="with --watch: refresh this many times, then exit"
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the broker before giving up (default 3)"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "stop":
        return _stop(args)
    if args.command == "status":
        return _status()
    if args.command == "stats":
        return _stats(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics: dict[str, Any] = {}
    if args.metrics_port is not None:
        if args.embedded:
            print("--metrics-port is for serve, not for an --embedded broker", file=sys.stderr)
            return 2
        try:
            require_prometheus()
        except MetricsError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        metrics = {"metrics_port": args.metrics_port, "metrics_host": args.metrics_host}
    try:
        check_bind(args.bind, secret_key=args.secret_key, insecure=args.insecure)
        asyncio.run(
            (serve_embedded if args.embedded else serve)(
                args.bind,
                **metrics,
                max_body=args.max_body,
                max_queue_length=args.max_queue_length,
                max_memory=args.max_memory,
                idle_timeout=args.idle_timeout,
                secret_key=args.secret_key,
                authorized_keys=args.authorized_keys,
                insecure=args.insecure,
                ipc_mode=args.ipc_mode,
                data_dir=args.data_dir,
                fsync=args.fsync,
            )
        )
    except ValueError as exc:  # refused configuration, unreadable key
        print(f"refusing to serve on {args.bind}: {exc}", file=sys.stderr)
        return 2
    except MetricsError as exc:  # the metrics port is in use
        print(str(exc), file=sys.stderr)
        return 1
    except (OSError, zmq.ZMQError) as exc:  # address in use, bad address, missing key file
        print(f"cannot serve on {args.bind}: {exc}", file=sys.stderr)
        if exc.errno == errno.EADDRINUSE:
            print(address_in_use_hint(args.bind), file=sys.stderr)
        return 1
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .stats_view import run

    return run(
        args.address,
        watch=args.watch,
        as_json=args.json,
        top=args.top,
        count=args.count,
        timeout=args.timeout,
        server_key=args.server_key,
        client_key=args.client_key,
    )


def _stop(args: argparse.Namespace) -> int:
    ok, message = stop_embedded(args.address, timeout=args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _status() -> int:
    directory, brokers, removed = status_embedded()
    print(f"runtime directory: {directory}")
    for path in removed:
        print(f"removed {path} (its broker is gone)")
    if not brokers:
        print("no embedded broker of this user runs")
        return 0
    for broker, answers in brokers:
        state = "serving" if answers else "NOT ANSWERING"
        print(f"{broker.address}  pid {broker.pid}  {state}  log: {broker.files.log}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from .keys import create_keypair

    try:
        public, secret = create_keypair(args.name, args.dir, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
