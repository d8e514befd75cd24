"""The durable usage outbox: a usage record is on disk before it is sent and leaves only when acknowledged.

One SQLite file in the state dir (WAL, synchronous=FULL), so a coordinator outage, ``kill -9`` or a
reboot loses no record; record ids are UUIDs and the coordinator counts an id once, so a record sent
again after a crash between "sent" and "acknowledged" is not doubled.

The running segment of each open inference session is kept here too (``hold_open``, rewritten at every
step by the handler process that serves it), so a ``kill -9`` in the middle of a session loses no step:
the next start moves what was held into the outbox (``recover_open_segments``). A segment's record keeps
its id from its first step to the moment it is added, so recovering it can never double it.

Record (the dict the serving-path hook adds; its schema is farworker/wire_records.UsageRecord)::

    {"id": "<uuid4>", "session_id": str, "blocks": [start, end], "tokens": int, "steps": int,
     "started_at": unix seconds (float), "ended_at": unix seconds (float)}
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import ValidationError

from farworker.wire_records import UsageRecord

log = logging.getLogger(__name__)

MAX_HELD = 50_000  # usage records kept in memory while the state dir refuses writes: ~10 MB, hours of serving

class OutboxError(ValueError):
    """A record does not have the shape above."""


def make_record(
    session_id: str,
    blocks: tuple[int, int] | list[int],
    tokens: int,
    steps: int,
    started_at: float,
    ended_at: float | None = None,
    record_id: str | None = None,
) -> dict:
    """A new usage record, with a fresh id unless ``record_id`` is given (an open segment keeps its id)."""
    return {
        "id": record_id or str(uuid.uuid4()),
        "session_id": str(session_id),
        "blocks": [int(blocks[0]), int(blocks[1])],
        "tokens": int(tokens),
        "steps": int(steps),
        "started_at": float(started_at),
        "ended_at": float(time.time() if ended_at is None else ended_at),
    }


# Errors that only say a value is over one of the coordinator's limits (lengths, counts, times): such a record is
# kept, and the coordinator's refusal sets it aside for the operator (Reporter), rather than the serving path losing
# it here. Any other error (a missing field, a wrong type, a span or time the wrong way round) refuses it at once.
OVER_A_LIMIT = frozenset({"string_too_long", "less_than_equal", "too_long"})


def validate_record(record: dict) -> dict:
    """Return a normalised copy of ``record`` or raise OutboxError naming the bad field. The schema is the
    coordinator's own (wire_records.UsageRecord), checked strictly (no "3" for 3)."""
    if not isinstance(record, dict):
        raise OutboxError("usage record must be a dict")
    candidate = dict(record)
    if isinstance(candidate.get("blocks"), tuple):
        candidate["blocks"] = list(candidate["blocks"])
    try:
        return UsageRecord.model_validate(candidate, strict=True).model_dump()
    except ValidationError as err:
        if not all(problem["type"] in OVER_A_LIMIT for problem in err.errors()):
            raise OutboxError(_first_problem(err)) from None
    return {**{name: candidate[name] for name in UsageRecord.model_fields}, "id": str(uuid.UUID(candidate["id"]))}


def _first_problem(err: ValidationError) -> str:
    """One line naming the field: 'usage record lacks session_id', 'usage record tokens: ...'."""
    problem = err.errors()[0]
    field = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "missing":
        return f"usage record lacks {field}"
    message = problem["msg"].removeprefix("Value error, ")
    return f"usage record {field}: {message}" if field else f"usage record: {message}"


def _encode(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


class Outbox:
    """Thread-safe, and safe to share between processes (SQLite locking, busy timeout)."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._listeners: list[Callable[[], None]] = []
        # Records the disk refused (state dir full), oldest first, written by write_held() once there is space.
        self._held: collections.deque[dict] = collections.deque()  # popped from the left as they are written
        self.held_dropped = 0  # beyond MAX_HELD: counted, and said in the journal and the status
        self.held_since: float | None = None
        self._held_lock = threading.RLock()  # the meter's thread holds, the runner's writes them
        with self._lock:
            self._connection().execute(
                "CREATE TABLE IF NOT EXISTS outbox ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " id TEXT NOT NULL UNIQUE,"
                " record TEXT NOT NULL,"
                " added_at REAL NOT NULL)"
            )
            self._connection().execute(
                "CREATE TABLE IF NOT EXISTS open_segments ("
                " id TEXT PRIMARY KEY, record TEXT NOT NULL, updated_at REAL NOT NULL)"
            )
            self._connection().execute(
                "CREATE TABLE IF NOT EXISTS rejected ("
                " id TEXT PRIMARY KEY, record TEXT NOT NULL, reason TEXT NOT NULL, rejected_at REAL NOT NULL)"
            )

    def _connection(self) -> sqlite3.Connection:
        # a connection must not cross a fork; the serving hook may run in a forked child
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction under this object's lock: committed on return, rolled back on any error."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite already rolled back a COMMIT refused by a full disk
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _insert(conn: sqlite3.Connection, record: dict) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO outbox (id, record, added_at) VALUES (?, ?, ?)",
            (record["id"], _encode(record), time.time()),
        )

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after each successful add in this process (the reporter's wake-up)."""
        self._listeners.append(callback)

    def notify_listeners(self) -> None:
        """Tell this process's listeners that records arrived (added here or by another process)."""
        for callback in self._listeners:
            callback()

    def add(self, record: dict) -> str:
        """Store ``record`` durably (committed and fsynced on return); returns its id. Adding an id twice
        keeps the first. A held open segment with the same id is replaced by it in the same transaction."""
        record = validate_record(record)
        with self._transaction() as conn:
            self._insert(conn, record)
            conn.execute("DELETE FROM open_segments WHERE id = ?", (record["id"],))
        self.notify_listeners()
        return record["id"]

    def add_or_hold(self, record: dict) -> bool:
        """``add``, but when the disk refuses the write (a full state dir), keep the record in memory instead
        (at most MAX_HELD, oldest first) so serving goes on; write_held() stores them once there is space.
        Returns whether the record is on disk. Order is kept: while records are held, new ones queue behind."""
        record = validate_record(record)
        with self._held_lock:
            if self.write_held():
                try:
                    self.add(record)
                    return True
                except (sqlite3.OperationalError, OSError) as err:
                    self._start_holding(err)
            if len(self._held) >= MAX_HELD:
                self.held_dropped += 1
                log.error("usage record %s lost: %d records already held in memory (state dir full)",
                          record["id"], MAX_HELD)
            else:
                self._held.append(record)
            return False

    def write_held(self) -> bool:
        """Store the records held in memory, oldest first; True when none is left."""
        with self._held_lock:
            while self._held:
                try:
                    self.add(self._held[0])
                except (sqlite3.OperationalError, OSError):
                    return False
                self._held.popleft()
                if not self._held:
                    log.warning("state dir writable again: the usage records held in memory since %s are in the "
                                "outbox", time.strftime("%H:%M:%S", time.localtime(self.held_since)))
                    self.held_since = None
            return True

    def held(self) -> dict:
        """For the status: records held in memory now, and lost beyond the bound."""
        return {"held_in_memory": len(self._held), "held_dropped": self.held_dropped, "held_since": self.held_since}

    def _start_holding(self, err: Exception) -> None:
        if self.held_since is None:
            self.held_since = time.time()
            log.error("usage outbox %s refuses writes (%s): usage records are held in memory (at most %d) and "
                      "written once the state dir has space; free space there", self.path, err, MAX_HELD)

    def hold_open(self, record: dict) -> None:
        """Keep the running segment of an open session on disk (replacing its previous version), called
        at every step. Committed without fsync (WAL, synchronous=NORMAL): it survives a ``kill -9`` of any
        process, and costs tens of microseconds per step instead of a disk flush; a power cut may lose the
        last steps held this way. Not validated here (it is on the serving path): ``add`` and
        ``recover_open_segments`` validate."""
        with self._lock:
            conn = self._connection()
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO open_segments (id, record, updated_at) VALUES (?, ?, ?)",
                    (record["id"], _encode(record), time.time()),
                )
            finally:
                conn.execute("PRAGMA synchronous=FULL")

    def recover_open_segments(self) -> list[dict]:
        """Move the segments a crashed run held open into the outbox (call at start, before serving).
        Returns the recovered records; one that fails validation is set aside as rejected."""
        recovered = []
        with self._transaction() as conn:
            for record_id, text in conn.execute("SELECT id, record FROM open_segments").fetchall():
                try:
                    record = validate_record(json.loads(text))
                except ValueError as err:  # OutboxError and a JSON decode error are both ValueErrors
                    conn.execute(
                        "INSERT OR REPLACE INTO rejected (id, record, reason, rejected_at) VALUES (?, ?, ?, ?)",
                        (record_id, text, f"unreadable open segment: {err}", time.time()),
                    )
                    continue
                self._insert(conn, record)
                recovered.append(record)
            conn.execute("DELETE FROM open_segments")
        if recovered:
            self.notify_listeners()
        return recovered

    def open_segments(self) -> list[dict]:
        """The segments held open now (sessions in progress, or a crashed run's until the next start)."""
        with self._lock:
            rows = self._connection().execute("SELECT record FROM open_segments ORDER BY updated_at").fetchall()
        return [json.loads(row[0]) for row in rows]

    def pending(self, limit: int = 100) -> list[dict]:
        """Oldest first, at most ``limit``."""
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT record FROM outbox ORDER BY seq LIMIT ?", (int(limit),))
                .fetchall()
            )
        return [json.loads(row[0]) for row in rows]

    def acknowledge(self, ids: Iterable[str]) -> int:
        """Delete acknowledged records; returns how many were deleted."""
        ids = list(ids)
        if not ids:
            return 0
        with self._transaction() as conn:
            return conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount

    def reject(self, record_id: str, reason: str) -> None:
        """Move a record the coordinator refuses as malformed out of the way (kept, for the operator),
        so one bad record cannot hold up the ones behind it."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rejected (id, record, reason, rejected_at)"
                " SELECT id, record, ?, ? FROM outbox WHERE id = ?",
                (reason, time.time(), record_id),
            )
            conn.execute("DELETE FROM outbox WHERE id = ?", (record_id,))

    def rejected(self) -> list[dict]:
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT record, reason FROM rejected ORDER BY rejected_at")
                .fetchall()
            )
        return [dict(json.loads(record), rejected_reason=reason) for record, reason in rows]

    def depth(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
