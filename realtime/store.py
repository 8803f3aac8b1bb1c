"""Durable records: conversation transcripts and usage, in SQLite (WAL), written off the event loop.

Why a writer thread: sqlite3 calls block (a commit waits for fsync), and the event loop must never wait
on a disk. Callers hand the store a transaction (a list of statements); one thread runs them in order,
commits each, and completes the caller's Future once the transaction is on disk. A session sends
``response.done`` only after its response's transaction is done, so a client that saw ``response.done``
can rely on the record surviving a crash of the server (``kill -9``); ``synchronous=FULL`` also survives
a power loss.

Tables (one row per thing, upserted as it changes):

* ``usage``: one row per session: key hash, audio seconds in and out, responses, timestamps.
* ``items``: the transcript: every conversation item of a session in order (role, text or transcript).
* ``responses``: every finished response: status, reason, seconds of audio.

``SessionLog`` is what a realtime session uses; another router can write its own statements with
``RecordStore.write``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from realtime.metrics import Metrics
from realtime.responder import item_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    session_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    end_reason TEXT,
    audio_in_s REAL NOT NULL DEFAULT 0,
    audio_out_s REAL NOT NULL DEFAULT 0,
    responses INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    session_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT,
    status TEXT,
    response_id TEXT,
    audio_ms INTEGER,
    updated_at REAL NOT NULL,
    PRIMARY KEY (session_id, item_id)
);
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    audio_out_ms INTEGER NOT NULL,
    created_at REAL NOT NULL,
    done_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_session ON responses (session_id, done_at);
CREATE INDEX IF NOT EXISTS usage_by_key ON usage (key_hash, started_at);
"""

Statement = tuple[str, tuple[Any, ...]]


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/duplex-server``, else ``~/.local/share/duplex-server``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "duplex-server"


def open_db(path: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode with the schema in place (the writer's, or a reader's in tools and tests)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise RuntimeError(f"{path} has record schema {version}; this server knows up to {SCHEMA_VERSION}")
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


class RecordStore:
    """One SQLite file, one writer thread, a bounded queue of transactions."""

    def __init__(self, path: str | Path, metrics: Metrics | None = None, queue_max: int = 10_000) -> None:
        self.path = Path(path)
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_max)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the file (creating folders and schema) and start the writer; raises if the file is unusable."""
        if self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = open_db(self.path)  # here, so a bad path fails the server's startup, not a later write
        self._thread = threading.Thread(target=self._run, args=(conn,), name="record-store", daemon=True)
        self._thread.start()
        log.info("records: %s", self.path)

    def write(self, statements: list[Statement]) -> concurrent.futures.Future:
        """Queue one transaction; the Future is done once it is committed (or failed, or dropped)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:
            fut.set_exception(RuntimeError("the record store is not running"))
            return fut
        try:
            self._queue.put_nowait((statements, fut))
        except queue.Full:
            self.metrics.store_errors.labels("dropped").inc()
            log.error("record store queue full: a transaction of %d statements was dropped", len(statements))
            fut.set_exception(RuntimeError("record store queue full"))
        self.metrics.store_queue.set(self._queue.qsize())
        return fut

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                statements, fut = item
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for sql, params in statements:
                            conn.execute(sql, params)
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                except sqlite3.Error as e:
                    self.metrics.store_errors.labels("failed").inc()
                    log.error("record store: a transaction failed: %s", e)
                    fut.set_exception(e)
                else:
                    self.metrics.store_commits.inc()
                    fut.set_result(None)
                self.metrics.store_queue.set(self._queue.qsize())
        finally:
            conn.close()


# ------------------------------------------------------------------ what a realtime session writes
_UPSERT_USAGE = """
INSERT INTO usage (session_id, key_hash, started_at, updated_at, ended_at, end_reason, audio_in_s, audio_out_s, responses)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id) DO UPDATE SET updated_at = excluded.updated_at, ended_at = excluded.ended_at,
    end_reason = excluded.end_reason, audio_in_s = excluded.audio_in_s, audio_out_s = excluded.audio_out_s,
    responses = excluded.responses
"""
_UPSERT_ITEM = """
INSERT INTO items (session_id, item_id, seq, role, kind, text, status, response_id, audio_ms, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, item_id) DO UPDATE SET text = excluded.text, status = excluded.status,
    response_id = COALESCE(excluded.response_id, items.response_id), audio_ms = excluded.audio_ms,
    updated_at = excluded.updated_at
"""
_INSERT_RESPONSE = """
INSERT OR REPLACE INTO responses (response_id, session_id, item_id, status, reason, audio_out_ms, created_at, done_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""


class SessionLog:
    """The records of one realtime session: items as they change, one transaction per finished response.

    Called on the event loop only; rows are snapshotted here (items are mutable dicts) and written by the
    store's thread.
    """

    def __init__(self, store: RecordStore, session_id: str, key_hash: str) -> None:
        self.store, self.session_id, self.key_hash = store, session_id, key_hash
        self.started_at = time.time()
        self.responses = 0
        self.audio_out_s = 0.0
        self._next_seq = 0
        # only what is not written yet (memory stays bounded however long the session):
        self._dirty: dict[str, tuple[int, dict[str, Any]]] = {}  # item id → (its order, the item)
        self._response_of: dict[str, str] = {}  # assistant item → its response
        self.store.write([self._usage(0.0, None, None)])

    def item_changed(self, item: dict[str, Any]) -> None:
        """An item was added or changed (transcript arrived, truncated): written with the next transaction."""
        if item["id"] not in self._dirty:  # a written item's order is kept by the upsert, whatever is sent
            self._dirty[item["id"]] = (self._next_seq, item)
            self._next_seq += 1

    def response_done(
        self, response_id: str, item_id: str, status: str, reason: str | None, created_at: float,
        audio_out_ms: int, audio_in_s: float,
    ) -> concurrent.futures.Future:
        """One transaction: the items changed since the last one, the response, and the session's usage."""
        self.responses += 1
        self.audio_out_s += audio_out_ms / 1000
        self._response_of[item_id] = response_id
        now = time.time()
        statements = self._item_rows(now)
        statements.append((_INSERT_RESPONSE, (response_id, self.session_id, item_id, status, reason, audio_out_ms,
                                              created_at, now)))
        statements.append(self._usage(audio_in_s, None, None, now))
        return self.store.write(statements)

    def end(self, audio_in_s: float, reason: str) -> concurrent.futures.Future:
        now = time.time()
        return self.store.write([*self._item_rows(now), self._usage(audio_in_s, now, reason, now)])

    def _item_rows(self, now: float) -> list[Statement]:
        rows = []
        for item_id, (seq, item) in self._dirty.items():
            content = item.get("content") or [{}]
            kind = "audio" if str(content[0].get("type", "")).endswith("audio") else "text"
            rows.append((_UPSERT_ITEM, (
                self.session_id, item_id, seq, item.get("role", ""), kind, item_text(item) or None,
                item.get("status"), self._response_of.pop(item_id, None), item.get("audio_ms"), now,
            )))
        self._dirty.clear()
        return rows

    def _usage(self, audio_in_s: float, ended_at: float | None, reason: str | None, now: float | None = None
               ) -> Statement:
        now = now or time.time()
        return (_UPSERT_USAGE, (self.session_id, self.key_hash, self.started_at, now, ended_at, reason,
                                round(audio_in_s, 3), round(self.audio_out_s, 3), self.responses))
