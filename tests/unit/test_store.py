"""The durable store on a real SQLite file: who commits a batch (the
broker's thread while commits are quick and nothing is handed off, else the
store's thread), that batches stay in order either way, and that the
write-ahead log is written out once and then reused."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from django_message_broker.server import store as store_module
from django_message_broker.server.store import Store

BODY = b"x" * 1024


def put(sid: int) -> tuple:
    return ("put", sid, "/", "jobs", 0, None, BODY)


def stored_ids(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM messages ORDER BY id")]


class SlowStore(Store):
    """A store on a disk that syncs slowly while ``slow_for`` says so (the
    sync is what the broker's thread must never wait for long)."""

    slow_for = 0.0

    def _write(self, conn: sqlite3.Connection, ops: list[tuple]) -> None:  # type: ignore[override]
        super()._write(conn, ops)
        if self.slow_for:
            time.sleep(self.slow_for)


def committed_through(commits: queue.SimpleQueue[tuple[int, Any]], last: int) -> None:
    """Wait until the store's thread reports every batch up to ``last``
    committed, without error."""
    seen = 0
    while seen < last:
        seq, error = commits.get(timeout=10)
        assert error is None
        seen = max(seen, seq)


def started(store: Store) -> queue.SimpleQueue[tuple[int, Any]]:
    commits: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
    store.load()
    store.start(lambda seq, error: commits.put((seq, error)))
    return commits


def test_a_quick_commit_is_made_on_the_callers_thread(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    store = Store(str(path), fsync="always")
    commits = started(store)
    try:
        assert store.submit(1, [put(1)]) == (1, None)  # committed, synced, on this thread
        assert stored_ids(path) == [1]
        assert commits.empty()  # nothing went through the store's thread
    finally:
        store.close()


def test_after_slow_syncs_the_stores_thread_commits_in_order_until_they_are_quick_again(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    store = SlowStore(str(path), fsync="off")
    commits = started(store)
    try:
        store.slow_for = 0.01  # 20 times the budget
        assert store.submit(1, [put(1)]) == (1, None)  # nothing said yet that syncs are slow
        # Now they are known to be: the store's thread takes the next
        # batches, and a put then its delete stay in that order.
        assert store.submit(2, [put(2)]) is None
        assert store.submit(3, [("del", 2), put(3)]) is None
        committed_through(commits, 3)
        assert stored_ids(path) == [1, 3]
        # The disk is quick again: the store's thread sees it, and the
        # broker's thread commits by itself again after a few batches.
        store.slow_for = 0.0
        for seq in range(4, 100):
            done = store.submit(seq, [put(seq)])
            if done is not None:
                assert done == (seq, None)
                break
            assert commits.get(timeout=10) == (seq, None)
        else:
            raise AssertionError("the broker's thread never committed by itself again")
    finally:
        store.close()


def test_a_batch_waits_behind_what_the_stores_thread_holds(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    store = SlowStore(str(path), fsync="off")
    commits: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
    entered, gate = threading.Event(), threading.Event()

    def on_commit(seq: int, error: Any) -> None:  # the store's thread stays here until the gate opens
        entered.set()
        assert gate.wait(10)
        commits.put((seq, error))

    store.load()
    store.start(on_commit)
    try:
        store.slow_for = 0.01
        assert store.submit(1, [put(1)]) == (1, None)  # slow, on this thread
        assert store.submit(2, [put(2)]) is None  # to the store's thread...
        assert entered.wait(10)  # ...which committed it and is held in on_commit
        assert store.submit(3, [put(3)]) is None  # waits in its queue
        # Commits look quick again and nobody holds the connection, yet
        # batch 4 must not be committed before batch 3 (its delete would
        # come before the put): it goes behind it.
        store._recent = 0.0  # what the moving average would say after quick commits
        store.slow_for = 0.0
        assert store.submit(4, [("del", 3)]) is None
        gate.set()
        committed_through(commits, 4)
        assert stored_ids(path) == [1, 2]
    finally:
        gate.set()
        store.close()


def test_the_log_is_written_out_once_and_reused_after_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    store = Store(str(path), fsync="off")
    commits = started(store)
    wal = Path(str(path) + "-wal")
    try:
        ahead = wal.stat().st_size
        assert ahead > store_module._WAL_PAGES * 4096  # written out at start
        # Four times the log's pages in 1 KiB messages, one per batch, each
        # awaited as a publisher awaits its confirm: without checkpoints the
        # log would grow to about 50 MiB.
        for seq in range(1, 4 * store_module._WAL_PAGES):
            if store.submit(seq, [put(seq)]) is None:
                assert commits.get(timeout=10) == (seq, None)
        assert wal.stat().st_size == ahead
        assert len(stored_ids(path)) == 4 * store_module._WAL_PAGES - 1
    finally:
        store.close()


def test_the_broker_waits_for_a_store_that_falls_far_behind(tmp_path: Path, monkeypatch: Any) -> None:
    """Publishers faster than the disk: past ``_MAX_BEHIND`` bytes of bodies
    not yet written, ``submit`` waits until the store's thread is halfway
    back, so the bodies waiting in memory stay bounded."""
    monkeypatch.setattr(store_module, "_MAX_BEHIND", 64 * 1024)
    path = tmp_path / "tasks.sqlite3"
    store = SlowStore(str(path), fsync="off")
    commits = started(store)
    try:
        store.slow_for = 0.005  # every batch goes to the store's thread, which takes its time
        store.submit(1, [put(1)])
        for seq in range(2, 200):
            store.submit(seq, [put(seq)])
            behind = store._handed_bytes - store._done_bytes
            assert behind <= 64 * 1024 + len(BODY), behind
        assert store.waited > 0
        committed_through(commits, 199)
        assert len(stored_ids(path)) == 199
    finally:
        store.close()
