"""Our broker for the durable benchmark: ``python -m benchmarks.durable_broker
serve --data-dir DIR ...`` runs ``python -m django_message_broker serve
--data-dir DIR ...`` unchanged, and also writes the durable store's counters
to ``DIR/bench-store-stats.json`` every 50 ms and at exit:

- ``commits``: transactions the store committed, on the broker's thread
  or its own (with ``--fsync always``, one sync of the write-ahead log
  each);
- ``synced_batches``: the broker's batches of work those transactions held
  (group commit: more than one batch per commit);
- ``write_s``: seconds spent in ``Store._write`` (a transaction from
  ``BEGIN`` to ``COMMIT``, the sync included), and
  ``ops``: the operations those transactions held.

The harness reads the file before and after each phase (``Store`` keeps
the counters as attributes; nothing in the broker changes).

``--bench-commit-delay-ms MS`` (removed before ``serve`` sees the command
line): the store sleeps MS after each commit, as a slower disk would
hold it; the harness's ``--commit-delay-ms``. ``DMB_BENCH_SWITCH_INTERVAL``:
``sys.setswitchinterval`` for the broker (a diagnostic).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from typing import Any

from django_message_broker.__main__ import main
from django_message_broker.server.store import Store

STATS_FILE = "bench-store-stats.json"
_INTERVAL = 0.05
_stores: list[Store] = []
_timing = {"write_s": 0.0, "ops": 0}
_commit_delay = 0.0  # seconds (--bench-commit-delay-ms)


def _write() -> None:
    for store in list(_stores):
        stats = {
            "commits": store.commits,
            "synced_batches": store.synced_batches,
            "fsync": store.fsync,
            **_timing,
            "at": time.time(),
        }
        path = os.path.join(os.path.dirname(os.path.abspath(store.path)), STATS_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(stats, handle)
        os.replace(tmp, path)


def _loop() -> None:
    while True:
        time.sleep(_INTERVAL)
        try:
            _write()
        except OSError:
            pass


_original_start = Store.start


def _start(self: Store, *args: Any, **kwargs: Any) -> None:
    _stores.append(self)
    _original_start(self, *args, **kwargs)


_original_write = Store._write


def _write_timed(conn: Any, ops: list[tuple]) -> None:
    began = time.perf_counter()
    try:
        _original_write(conn, ops)
        if _commit_delay:
            time.sleep(_commit_delay)
    finally:
        _timing["write_s"] += time.perf_counter() - began
        _timing["ops"] += len(ops)


Store.start = _start  # type: ignore[method-assign]
Store._write = staticmethod(_write_timed)  # type: ignore[method-assign]
if os.environ.get("DMB_BENCH_SWITCH_INTERVAL"):  # a diagnostic: sys.setswitchinterval for the whole broker
    sys.setswitchinterval(float(os.environ["DMB_BENCH_SWITCH_INTERVAL"]))
threading.Thread(target=_loop, name="bench-store-stats", daemon=True).start()
atexit.register(_write)

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--bench-commit-delay-ms" in argv:  # a slower disk: each commit holds on
        at = argv.index("--bench-commit-delay-ms")
        _commit_delay = float(argv[at + 1]) / 1000.0
        del argv[at : at + 2]
    sys.exit(main(argv))
