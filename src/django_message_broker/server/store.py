"""The durable store: durable task queues and their persistent messages on
disk, in SQLite (standard library, WAL mode).

How it works. The broker core (``tasks.py``) decides and journals: every
change to durable state (a persistent message put on a durable queue, its
delivery, its ack, a purge, a durable queue, exchange or binding declared or
deleted) is an operation in ``Tasks.journal``. After each batch of input the
shell hands the journal to ``Store.submit`` with a sequence number, and the
batch is committed in one transaction: with ``fsync="always"`` (SQLite's
``synchronous=FULL``) the commit returns once the data is on disk. Who
commits: the broker's own thread, between two reads of its socket, while
commits are quick (``_INLINE_BUDGET``) and nothing is handed off; else the
store's thread, which takes every batch waiting into one transaction, so
many publishers share one sync (group commit), and reports the highest
sequence committed through ``on_commit``. Either way the broker answers the
confirmed publishes of a batch only once it is committed, so a confirmed
message is on disk. ``everysec`` commits without syncing
(``synchronous=NORMAL``) and syncs once a second (a checkpoint): a crash of
the machine loses up to a second, a crash of the broker nothing. ``off``
leaves syncing to the operating system. Checkpoints run on the store's
thread, never beside a commit, and the log is written out to its full
length at start, so commits overwrite it instead of growing it.

On start, ``load`` reads everything back: queues, exchanges, bindings, and
messages in the order they were put. A message delivered and not acked
when the broker stopped comes back marked redelivered. A damaged database
is reported (``StoreDamaged``) with what SQLite says, and moved aside
rather than overwritten, so nothing is lost to a second mistake.

A store that fails to write (a full disk) reports the failed sequence
numbers with the error; the broker refuses those confirms with
``QueueFull`` (its reason says why) and keeps serving everything in memory.
The failed operations are written again, first, with the next batch: an
ack is never forgotten, and a message whose confirm failed may still reach
the disk (the publisher, told it failed, may send it again: at least once).
"""

from __future__ import annotations

import json
import logging
import os
import queue as queue_module
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["FSYNC_MODES", "Store", "StoreDamaged", "StoredState"]

logger = logging.getLogger("django_message_broker.server")

FSYNC_MODES = ("always", "everysec", "off")
_SYNCHRONOUS = {"always": "FULL", "everysec": "NORMAL", "off": "OFF"}
#: Pages of the write-ahead log (4 KiB each: 16 MiB) written out at start
#: (``_preallocate_wal``); checkpoints come before half of them are used.
_WAL_PAGES = 4096
#: The broker's thread commits a batch itself only while commits take less
#: than this (``Store.submit``); on slower disks the store's thread does.
_INLINE_BUDGET = 0.0005
_CHECKPOINT = "checkpoint"
#: Bytes of bodies the store's thread may be behind the broker before the
#: broker's thread waits for it (``Store._catch_up``).
_MAX_BEHIND = 64 << 20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queues (
    vhost TEXT NOT NULL, name TEXT NOT NULL, arguments TEXT NOT NULL, auto_delete INTEGER NOT NULL,
    PRIMARY KEY (vhost, name));
CREATE TABLE IF NOT EXISTS exchanges (
    vhost TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, auto_delete INTEGER NOT NULL,
    PRIMARY KEY (vhost, name));
CREATE TABLE IF NOT EXISTS bindings (
    vhost TEXT NOT NULL, exchange TEXT NOT NULL, queue TEXT NOT NULL, routing_key TEXT NOT NULL,
    PRIMARY KEY (vhost, exchange, queue, routing_key));
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, vhost TEXT NOT NULL, queue TEXT NOT NULL, priority INTEGER NOT NULL,
    expires REAL, delivered INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (vhost, queue);
"""
_SQL = {
    "put": "INSERT OR REPLACE INTO messages (id, vhost, queue, priority, expires, body) VALUES (?, ?, ?, ?, ?, ?)",
    "del": "DELETE FROM messages WHERE id = ?",
    "dlv": "UPDATE messages SET delivered = 1 WHERE id = ?",
    "q+": "INSERT OR REPLACE INTO queues (vhost, name, arguments, auto_delete) VALUES (?, ?, ?, ?)",
    "x+": "INSERT OR REPLACE INTO exchanges (vhost, name, type, auto_delete) VALUES (?, ?, ?, ?)",
    "x-": "DELETE FROM exchanges WHERE vhost = ? AND name = ?",
    "b+": "INSERT OR IGNORE INTO bindings (vhost, exchange, queue, routing_key) VALUES (?, ?, ?, ?)",
    "b-": "DELETE FROM bindings WHERE vhost = ? AND exchange = ? AND queue = ? AND routing_key = ?",
}


class StoreDamaged(Exception):
    """The database could not be read: what SQLite said, and where the
    damaged file was moved."""


@dataclass
class StoredState:
    """What ``load`` read back."""

    queues: list[tuple[str, str, dict, bool]] = field(default_factory=list)
    exchanges: list[tuple[str, str, str, bool]] = field(default_factory=list)
    bindings: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: (id, vhost, queue, priority, expires (wall clock) or None, delivered,
    #: body), in order, read as they are consumed. The body is ``None``: it
    #: stays on disk until a delivery needs it (``read_body``).
    messages: Iterable[tuple[int, str, str, int, Optional[float], bool, Optional[bytes]]] = ()
    #: What was wrong, if the database was damaged and set aside.
    damage: Optional[str] = None


class Store:
    """``Store(path, fsync=...)``; ``load()`` once, then ``start(on_commit)``,
    ``submit(seq, ops)`` from the broker's thread, ``close()`` at the end."""

    def __init__(self, path: str, *, fsync: str = "always") -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self.path = path
        self.fsync = fsync
        self._queue: queue_module.SimpleQueue[Any] = queue_module.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._conn: Optional[sqlite3.Connection] = None
        self._reader: Optional[sqlite3.Connection] = None
        #: Jobs handed to the store's thread, and those it has done (each
        #: counted by one thread only): while they differ, the broker's
        #: thread does not commit by itself, so batches stay in order.
        self._handed = 0
        self._done = 0
        #: The same in bytes of message bodies, and the broker's thread's
        #: wait for the store's thread to catch up (``_catch_up``).
        self._handed_bytes = 0
        self._done_bytes = 0
        self._caught_up = threading.Condition(threading.Lock())
        #: Seconds the broker's thread waited for the store (a slow disk).
        self.waited = 0.0
        #: Held by whichever thread uses ``_conn``.
        self._lock = threading.Lock()
        #: How long commits take lately (seconds, a moving average).
        self._recent = 0.0
        #: Pages written to the log since the last checkpoint (estimated).
        self._wal_pages = 0
        self._checkpoint_due = False
        #: Operations of transactions that failed (a full disk): written
        #: again, first, with the next batch, so that acks are not forgotten.
        self._retry: list[tuple] = []
        self.commits = 0
        self.synced_batches = 0
        self.failures = 0

    # -- opening ------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the store's thread checkpoints (_checkpoint)
        conn.executescript(_SCHEMA)
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        _preallocate_wal(self.path + "-wal", 32 + _WAL_PAGES * (24 + page))  # header, frames
        return conn

    def load(self) -> StoredState:
        """Open (or create) the database and read it back. A database SQLite
        cannot read is moved aside (``<path>.damaged-<time>``) and a new one
        started; ``StoredState.damage`` says what happened."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        damage = None
        try:
            self._conn = self._connect()
            state = self._read(self._conn)
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            return state
        except sqlite3.DatabaseError as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            aside = f"{self.path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            damage = f"{self.path} could not be read ({exc}); moved to {aside} and started afresh"
            logger.error("durable store: %s", damage)
        self._conn = self._connect()
        state = self._read(self._conn)
        state.damage = damage
        return state

    @staticmethod
    def _read(conn: sqlite3.Connection) -> StoredState:
        state = StoredState()
        for vhost, name, arguments, auto_delete in conn.execute(
            "SELECT vhost, name, arguments, auto_delete FROM queues"
        ):
            state.queues.append((vhost, name, json.loads(arguments), bool(auto_delete)))
        for vhost, name, kind, auto_delete in conn.execute("SELECT vhost, name, type, auto_delete FROM exchanges"):
            state.exchanges.append((vhost, name, kind, bool(auto_delete)))
        state.bindings = list(conn.execute("SELECT vhost, exchange, queue, routing_key FROM bindings"))
        rows = conn.execute("SELECT id, vhost, queue, priority, expires, delivered FROM messages ORDER BY id")
        state.messages = ((i, v, q, pr, ex, bool(d), None) for i, v, q, pr, ex, d in rows)
        return state

    def read_body(self, sid: int) -> Optional[bytes]:
        """A stored message's body (``None`` if it is not there), for the
        broker's thread: its own connection, which sees what was committed."""
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        row = self._reader.execute("SELECT body FROM messages WHERE id = ?", (sid,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- writing ------------------------------------------------------------------
    def start(self, on_commit: Callable[[int, Optional[str]], None]) -> None:
        """Start the store's thread. ``on_commit(seq, error)`` is called on it
        after each transaction it commits: every batch up to ``seq`` is
        committed (``error`` None) or failed (``error`` says why)."""
        assert self._conn is not None, "load() first"
        self._thread = threading.Thread(target=self._run, args=(on_commit,), name="dmb-store", daemon=True)
        self._thread.start()

    def submit(self, seq: int, ops: list[tuple]) -> Optional[tuple[int, Optional[str]]]:
        """Write a batch of operations, from the broker's thread.

        If that thread has nothing in hand and commits have been quick
        lately (under ``_INLINE_BUDGET``), the batch is committed here and
        then, on this thread, and ``(seq, error)`` is returned: a lone
        publisher's confirm then costs no hand-off to another thread and
        back (about 0.1 ms each way measured here). Otherwise the store's
        thread takes it, with whatever else comes meanwhile (group commit),
        and reports through ``on_commit``; None is returned. A sync that is
        slow (a spinning or network disk) thus holds the broker's thread,
        and Channels' traffic with it, no longer than the budget, unless
        the store's thread falls more than ``_MAX_BEHIND`` behind
        (``_catch_up``)."""
        if self._handed == self._done and self._recent < _INLINE_BUDGET and self._lock.acquire(blocking=False):
            try:
                return seq, self._commit(ops, 1)
            finally:
                self._lock.release()
        size = _body_bytes(ops)
        self._handed += 1
        self._handed_bytes += size
        self._queue.put((seq, ops, size))
        if self._handed_bytes - self._done_bytes > _MAX_BEHIND:
            self._catch_up()
        return None

    def _catch_up(self) -> None:
        """The store's thread is more than ``_MAX_BEHIND`` bytes of bodies
        behind (publishers faster than the disk): wait on the broker's
        thread until it is halfway back. The broker stops reading its
        socket meanwhile, so ZeroMQ's high-water marks slow the publishers
        down instead of their bodies piling up in the broker's memory."""
        began = time.monotonic()
        with self._caught_up:
            while self._handed_bytes - self._done_bytes > _MAX_BEHIND // 2:
                if self._thread is None or not self._thread.is_alive():
                    return
                self._caught_up.wait(1.0)
        self.waited += time.monotonic() - began

    def _commit(self, ops: list[tuple], batches: int) -> Optional[str]:
        """One transaction, under ``_lock``; failed operations are kept and
        written first next time."""
        conn = self._conn
        assert conn is not None
        if self._retry:
            ops = self._retry + ops
        began = time.perf_counter()
        try:
            self._write(conn, ops)
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._retry = ops
            self.failures += 1
            logger.error("durable store: a write failed (%d operation(s) kept to retry): %s", len(ops), exc)
            return f"durable store: {exc}"
        finally:
            self._recent += (time.perf_counter() - began - self._recent) * 0.25
        self.commits += 1
        self.synced_batches += batches
        if self._retry:
            logger.warning("durable store: writing again after %d failed operation(s)", len(self._retry))
            self._retry = []
        # Checkpoint before the log outgrows what was written out at start
        # (an estimate: a page per operation and per 4 KiB of body, and
        # one for the transaction), on the store's thread and never
        # beside a commit, so that SQLite starts the log over afterwards.
        self._wal_pages += 1 + len(ops) + _body_bytes(ops) // 4096
        if self._wal_pages >= _WAL_PAGES // 2 and not self._checkpoint_due:
            self._checkpoint_due = True
            if threading.current_thread() is not self._thread:
                self._handed += 1
                self._queue.put(_CHECKPOINT)
        return None

    def _checkpoint(self) -> None:
        """Under ``_lock``: copy the log into the database; SQLite writes
        the log from its start again with the next transaction."""
        assert self._conn is not None
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            logger.warning("durable store: checkpoint failed: %s", exc)
        self._wal_pages = 0
        self._checkpoint_due = False

    def _run(self, on_commit: Callable[[int, Optional[str]], None]) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        next_sync = time.monotonic() + 1.0
        while True:
            timeout = max(0.0, next_sync - time.monotonic()) if self.fsync == "everysec" else None
            jobs: list[Any] = []
            try:
                jobs.append(get(timeout=timeout))
            except queue_module.Empty:
                pass
            while True:  # group commit: everything waiting goes in one transaction
                try:
                    jobs.append(get_nowait())
                except queue_module.Empty:
                    break
            batches = [job for job in jobs if type(job) is tuple]
            with self._lock:
                if self._checkpoint_due:  # first: these batches then go to the log's start
                    self._checkpoint()
                if batches:
                    error = self._commit([op for _, batch, _ in batches for op in batch], len(batches))
                if self._checkpoint_due or (self.fsync == "everysec" and time.monotonic() >= next_sync):
                    next_sync = time.monotonic() + 1.0  # everysec: the checkpoint syncs the log
                    self._checkpoint()
                # Done: the broker's thread may commit by itself again.
                self._done += len(batches) + jobs.count(_CHECKPOINT)
            if batches:
                with self._caught_up:
                    self._done_bytes += sum(size for _, _, size in batches)
                    self._caught_up.notify()
            if batches:
                on_commit(batches[-1][0], error)
            if None in jobs:  # close(): what came before is written
                return

    @staticmethod
    def _write(conn: sqlite3.Connection, ops: list[tuple]) -> None:
        conn.execute("BEGIN")
        run: list[tuple] = []
        kind = ""
        for op in ops:
            if op[0] != kind:
                _flush(conn, kind, run)
                kind, run = op[0], []
            run.append(op[1:])
        _flush(conn, kind, run)
        conn.execute("COMMIT")

    def close(self) -> None:
        """Write what was submitted, then stop and close."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None


def _body_bytes(ops: list[tuple]) -> int:
    """Bytes of message bodies in ``ops`` (a ``put``'s last field)."""
    return sum(len(op[-1]) for op in ops if op[0] == "put")


def _preallocate_wal(path: str, size: int) -> None:
    """Write zeros past the end of the write-ahead log, up to ``size``.

    A commit that makes the log longer costs a second flush (ext4 journals
    the new length): 0.37 ms against 0.19 ms per commit measured here, with
    ``fsync always``. SQLite goes back to the log's start after each
    checkpoint (they come before half of ``_WAL_PAGES`` is used), so a log
    written out to that length once is only ever overwritten. Zeros are not frames (a frame's
    salts and checksum must match the log's header), so SQLite reads
    exactly what it would read without them, and so does its recovery."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        start = end = os.fstat(fd).st_size
        if end >= size:
            return
        chunk = bytes(1 << 20)
        try:
            while end < size:
                end += os.pwrite(fd, chunk[: size - end], end)
            os.fsync(fd)
        except OSError as exc:  # a full disk: give the space back, do without
            os.ftruncate(fd, start)
            logger.warning("durable store: could not write out the log's %d bytes ahead (%s)", size, exc)
    finally:
        os.close(fd)


def _flush(conn: sqlite3.Connection, kind: str, rows: list[tuple]) -> None:
    if not rows:
        return
    if kind == "q-":  # a durable queue goes with its messages and bindings
        conn.executemany("DELETE FROM messages WHERE vhost = ? AND queue = ?", rows)
        conn.executemany("DELETE FROM bindings WHERE vhost = ? AND queue = ?", rows)
        conn.executemany("DELETE FROM queues WHERE vhost = ? AND name = ?", rows)
    else:
        conn.executemany(_SQL[kind], rows)
