"""SQLite storage of the reference coordinator (SQL only: the rules deciding what to store live in services/).

Workers, heartbeats, nonces, the usage ledger, completions. One connection behind a lock: the reference coordinator
serves a private mesh, and SQLite serialises writers anyway. Every write that belongs to one request is one transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path

from farworker.coordinator.errors import StoreFull
from farworker.coordinator.services import ledger
from farworker.coordinator.write_refusals import WriteRefusals

HEARTBEAT_HISTORY = 500  # kept per worker; older beats only live on as counts

_WORKERS_COLUMNS = """
    worker_id TEXT PRIMARY KEY,
    peer_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    wallet_address TEXT NOT NULL,
    model_name TEXT NOT NULL,
    block_start INTEGER,  -- NULL until the worker knows its span (registered before loading it)
    block_end INTEGER,
    total_blocks INTEGER,
    torch_dtype TEXT NOT NULL,
    quant_type TEXT NOT NULL,
    location TEXT NOT NULL,
    farworker_version TEXT NOT NULL,
    announce_maddrs TEXT NOT NULL,
    hardware TEXT NOT NULL,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_registered_at REAL NOT NULL,
    heartbeat_interval REAL NOT NULL,
    heartbeat_count INTEGER NOT NULL DEFAULT 0,
    counted_beat_at REAL,
    last_heartbeat_at REAL,
    last_heartbeat TEXT,
    host_id TEXT,  -- NULL from workers before multi-GPU hosts (and from any that send none)
    instance INTEGER,
    reachability TEXT  -- JSON {"at", "tried": {address: null or why not}} of the last dial; NULL: not dialled yet
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS workers ({_WORKERS_COLUMNS});
CREATE TABLE IF NOT EXISTS heartbeats (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    received_at REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS heartbeats_worker ON heartbeats(worker_id, seq);
CREATE INDEX IF NOT EXISTS workers_registered ON workers(registered_at, worker_id);  -- the pages' order
CREATE TABLE IF NOT EXISTS nonces (
    peer_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (peer_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_seen ON nonces(seen_at);
CREATE TABLE IF NOT EXISTS usage (
    id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    session_id TEXT NOT NULL,
    block_start INTEGER NOT NULL,
    block_end INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    received_at REAL NOT NULL,
    share REAL NOT NULL,
    reliability REAL NOT NULL,
    earned_far REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_worker ON usage(worker_id, received_at);
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS completion_keys (  -- which API key asked for a completion (keys configured)
    completion_id TEXT PRIMARY KEY REFERENCES completions(id),
    key_name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS completion_route (
    completion_id TEXT NOT NULL REFERENCES completions(id),
    peer_id TEXT NOT NULL,
    worker_id TEXT,
    block_start INTEGER NOT NULL,
    block_end INTEGER NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS completion_route_peer ON completion_route(peer_id);
CREATE TABLE IF NOT EXISTS probes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    at REAL NOT NULL,
    block INTEGER NOT NULL,
    tokens INTEGER NOT NULL,  -- positions the worker computed: attested work
    error REAL,  -- relative L2 error against the reference; NULL: no answer
    tolerance REAL NOT NULL,
    problem TEXT  -- NULL: passed
);
CREATE INDEX IF NOT EXISTS probes_worker ON probes(worker_id, seq);
CREATE TABLE IF NOT EXISTS receipts (  -- direct clients' signed receipts: what vouches for direct traffic
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL UNIQUE,  -- a server session is vouched for once, whatever receipts name it
    peer_id TEXT NOT NULL,  -- pays only the worker of this peer id
    block_start INTEGER NOT NULL,
    block_end INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    model TEXT NOT NULL,
    client_key_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    received_at REAL NOT NULL,
    receipt TEXT NOT NULL  -- as signed, for audits
);
CREATE INDEX IF NOT EXISTS receipts_peer ON receipts(peer_id);
CREATE TABLE IF NOT EXISTS uptime_slots (  -- per heartbeat interval since registration: what was observed in it
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    slot INTEGER NOT NULL,  -- services/uptime.interval_slot; slot 0 (the registration's) is never recorded
    beat INTEGER NOT NULL DEFAULT 0,  -- 1: a valid, healthy heartbeat arrived in it
    online INTEGER NOT NULL DEFAULT 0,  -- 1: the coordinator saw the worker's whole span ONLINE in the DHT in it
    PRIMARY KEY (worker_id, slot)
);
CREATE TABLE IF NOT EXISTS quarantine (
    worker_id TEXT PRIMARY KEY REFERENCES workers(worker_id),
    since REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

DATA_TABLES = ("workers", "heartbeats", "usage", "completions", "completion_keys", "completion_route", "probes",
               "quarantine", "receipts", "uptime_slots")


def _allow_unknown_blocks(conn: sqlite3.Connection) -> None:
    """Ledgers written before workers registered ahead of loading their blocks have NOT NULL block
    columns in ``workers``. SQLite cannot drop a constraint, so the table is rebuilt with today's
    definition and its rows copied (SQLite's documented ALTER TABLE procedure; foreign keys are off
    meanwhile, and heartbeats and usage keep referring to ``workers`` by name)."""
    columns = {row[1]: row[3] for row in conn.execute("PRAGMA table_info(workers)")}
    if not columns.get("block_start"):
        return
    names = ", ".join(columns)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"CREATE TABLE workers_unknown_blocks ({_WORKERS_COLUMNS})")
        conn.execute(f"INSERT INTO workers_unknown_blocks ({names}) SELECT {names} FROM workers")
        conn.execute("DROP TABLE workers")
        conn.execute("ALTER TABLE workers_unknown_blocks RENAME TO workers")
        if conn.execute("PRAGMA foreign_key_check").fetchall():
            raise sqlite3.IntegrityError("the rebuilt workers table breaks a foreign key")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _add_host_columns(conn: sqlite3.Connection) -> None:
    """Ledgers written before workers said which host they run on lack the host columns: added, NULL."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(workers)")}
    for name, kind in (("host_id", "TEXT"), ("instance", "INTEGER")):
        if name not in columns:
            conn.execute(f"ALTER TABLE workers ADD COLUMN {name} {kind}")


def _add_reachability_column(conn: sqlite3.Connection) -> None:
    """Ledgers written before the coordinator dialled workers lack the column: added, NULL (not dialled)."""
    if "reachability" not in {row[1] for row in conn.execute("PRAGMA table_info(workers)")}:
        conn.execute("ALTER TABLE workers ADD COLUMN reachability TEXT")


LOW_SPACE_BYTES = 1 << 20  # an I/O error while the database's file system has less free than this: it is full


def store_full(err: BaseException, path: Path) -> StoreFull | None:
    """The write refused for want of space, as StoreFull; None for any other error. SQLite says SQLITE_FULL when a
    write to the database, its WAL or journal hits ENOSPC; growing the WAL's shared-memory index gives an I/O error
    instead (SQLITE_IOERR_SHMSIZE and kin), taken as "full" when the file system has no space left."""
    if not isinstance(err, sqlite3.OperationalError):
        return None
    code = getattr(err, "sqlite_errorcode", 0)
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return StoreFull(f"{err}, on {path.parent}")
    if code & 0xFF == sqlite3.SQLITE_IOERR:
        try:
            stat = os.statvfs(path.parent)
        except OSError:
            return None
        if stat.f_bavail * stat.f_frsize < LOW_SPACE_BYTES:
            return StoreFull(f"{err} with {stat.f_bavail * stat.f_frsize} bytes free on {path.parent}")
    return None


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write_refusals = WriteRefusals()
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._conn.executescript(_LEASES_SCHEMA)
        _allow_unknown_blocks(self._conn)
        _add_host_columns(self._conn)
        _add_reachability_column(self._conn)
        self._conn.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self):
        """One write transaction under the lock. A write refused for want of space (disk full) is rolled back
        whole and raised as StoreFull; the next transaction starts clean, so writes resume once there is space."""
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                try:
                    store._conn.execute("BEGIN IMMEDIATE")
                except BaseException as err:
                    store._lock.release()
                    full = store._refused(err)
                    if full is None:
                        raise
                    raise full from err
                return store._conn

            def __exit__(self, exc_type, exc, tb):
                try:
                    if exc is None:
                        try:
                            store._conn.execute("COMMIT")
                        except sqlite3.Error as err:  # not committed: below, rolled back and raised
                            exc = err
                        else:
                            store.write_refusals.accepted()
                            return False
                    if store._conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL may)
                        with contextlib.suppress(sqlite3.Error):  # the error that got us here is raised below
                            store._conn.execute("ROLLBACK")
                finally:
                    store._lock.release()
                full = store._refused(exc)
                if full is not None:
                    raise full from exc
                if exc_type is None:
                    raise exc  # the failed COMMIT
                return False

        return _Tx()

    def _refused(self, err: BaseException) -> StoreFull | None:
        full = store_full(err, self.path)
        if full is not None:
            self.write_refusals.refused(full.reason)
        return full

    def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # --- auth ---------------------------------------------------------------------------------------
    def public_key_of(self, peer_id: str) -> str | None:
        rows = self._read("SELECT public_key FROM workers WHERE peer_id = ?", (peer_id,))
        return rows[0]["public_key"] if rows else None

    def consume_nonce(self, peer_id: str, nonce: str, now: float, keep_s: float) -> bool:
        """Remember ``nonce``; False if it was seen before. Nonces older than ``keep_s`` are forgotten:
        the timestamp window refuses their requests anyway."""
        with self._tx() as conn:
            conn.execute("DELETE FROM nonces WHERE seen_at < ?", (now - keep_s,))
            try:
                conn.execute(
                    "INSERT INTO nonces (peer_id, nonce, seen_at) VALUES (?, ?, ?)", (peer_id, nonce, now)
                )
            except sqlite3.IntegrityError:
                return False
        return True

    # --- workers ------------------------------------------------------------------------------------
    def register(self, req: dict, now: float, interval: float) -> str:
        """Insert or refresh the worker of ``req['peer_id']``; its worker id survives restarts."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT worker_id FROM workers WHERE peer_id = ?", (req["peer_id"],)
            ).fetchone()
            fields = {
                "public_key": req["public_key"],
                "wallet_address": req["wallet_address"],
                "model_name": req["model_name"],
                "block_start": req["blocks"][0] if req["blocks"] else None,
                "block_end": req["blocks"][1] if req["blocks"] else None,
                "total_blocks": req.get("total_blocks"),
                "torch_dtype": req["torch_dtype"],
                "quant_type": req["quant_type"],
                "location": req["location"],
                "farworker_version": req["version"],
                "announce_maddrs": json.dumps(req["announce_maddrs"]),
                "hardware": json.dumps(req["hardware"]),
                "host_id": req.get("host_id"),
                "instance": req.get("instance"),
                "state": "joining",
                "last_registered_at": now,
                "heartbeat_interval": interval,
            }
            if row:
                worker_id = row["worker_id"]
                assignments = ", ".join(f"{k} = ?" for k in fields)
                conn.execute(
                    f"UPDATE workers SET {assignments} WHERE worker_id = ?", [*fields.values(), worker_id]
                )
            else:
                worker_id = f"w-{uuid.uuid4().hex[:16]}"
                fields.update(worker_id=worker_id, peer_id=req["peer_id"], registered_at=now)
                conn.execute(
                    f"INSERT INTO workers ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                    list(fields.values()),
                )
        return worker_id

    def worker_row(self, worker_id: str) -> dict | None:
        rows = self._read("SELECT * FROM workers WHERE worker_id = ?", (worker_id,))
        return dict(rows[0]) if rows else None

    def heartbeat(self, worker_id: str, payload: dict, now: float) -> None:
        """Store a beat, and the uptime slot it counts for (services/ledger.beat_slot decides, in this transaction)."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT counted_beat_at, heartbeat_interval, registered_at FROM workers WHERE worker_id = ?",
                (worker_id,),
            ).fetchone()
            counted_slot = ledger.beat_slot(row["registered_at"], row["counted_beat_at"], now,
                                            row["heartbeat_interval"], payload.get("healthy", True))
            counts = counted_slot is not None
            updates = {
                "state": payload["state"],
                "last_heartbeat_at": now,
                "last_heartbeat": json.dumps(payload),
            }
            if payload.get("blocks"):
                updates.update(block_start=payload["blocks"][0], block_end=payload["blocks"][1])
            assignments = ", ".join(f"{k} = ?" for k in updates)
            extra = ", heartbeat_count = heartbeat_count + 1, counted_beat_at = ?" if counts else ""
            args = [*updates.values(), *([now] if counts else []), worker_id]
            conn.execute(f"UPDATE workers SET {assignments}{extra} WHERE worker_id = ?", args)
            if counts:  # the slot itself too: with a mesh view, uptime needs the beat and the DHT in one slot
                conn.execute(
                    "INSERT INTO uptime_slots (worker_id, slot, beat) VALUES (?, ?, 1)"
                    " ON CONFLICT (worker_id, slot) DO UPDATE SET beat = 1",
                    (worker_id, counted_slot),
                )
            conn.execute(
                "INSERT INTO heartbeats (worker_id, received_at, payload) VALUES (?, ?, ?)",
                (worker_id, now, json.dumps(payload)),
            )
            conn.execute(
                "DELETE FROM heartbeats WHERE worker_id = ? AND seq <= "
                "(SELECT seq FROM heartbeats WHERE worker_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (worker_id, worker_id, HEARTBEAT_HISTORY),
            )

    def heartbeats(self, worker_id: str) -> list[dict]:
        rows = self._read(
            "SELECT received_at, payload FROM heartbeats WHERE worker_id = ? ORDER BY seq", (worker_id,)
        )
        return [{"received_at": r["received_at"], **json.loads(r["payload"])} for r in rows]

    def set_state(self, worker_id: str, state: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE workers SET state = ? WHERE worker_id = ?", (state, worker_id))

    def worker_ids(self) -> list[str]:
        return [r["worker_id"] for r in self._read("SELECT worker_id FROM workers ORDER BY registered_at")]

    def worker_by_peer(self, peer_id: str) -> str | None:
        rows = self._read("SELECT worker_id FROM workers WHERE peer_id = ?", (peer_id,))
        return rows[0]["worker_id"] if rows else None

    def worker_rows_page(self, after: tuple[float, str] | None, limit: int) -> list[dict]:
        """At most ``limit`` workers in registration order (then worker id), after ``(registered_at, worker_id)``."""
        sql, args = "SELECT * FROM workers", []
        if after is not None:
            sql, args = sql + " WHERE (registered_at, worker_id) > (?, ?)", list(after)
        return [dict(r) for r in self._read(sql + " ORDER BY registered_at, worker_id LIMIT ?", [*args, limit])]

    def host_keys_page(self, after: tuple[int, str] | None, limit: int) -> list[tuple[int, str]]:
        """At most ``limit`` hosts as (0, host id), then (1, "") for the workers that sent no host id, after
        ``after``."""
        sql, args = ("SELECT DISTINCT CASE WHEN host_id IS NULL THEN 1 ELSE 0 END AS no_host,"
                     " COALESCE(host_id, '') AS host FROM workers", [])
        if after is not None:
            sql, args = sql + " WHERE (CASE WHEN host_id IS NULL THEN 1 ELSE 0 END, COALESCE(host_id, '')) > (?, ?)", \
                list(after)
        rows = self._read(sql + " ORDER BY no_host, host LIMIT ?", [*args, limit])
        return [(int(r["no_host"]), r["host"]) for r in rows]

    def worker_rows_of_hosts(self, host_ids: list[str], no_host: bool) -> list[dict]:
        """The workers registered with these host ids (and, ``no_host``, those that sent none)."""
        marks = ", ".join("?" * len(host_ids))
        sql = f"SELECT * FROM workers WHERE host_id IN ({marks})" + (" OR host_id IS NULL" if no_host else "")
        return [dict(r) for r in self._read(sql + " ORDER BY registered_at, worker_id", host_ids)]

    # --- proven workers (services/registration.py, services/probe_order.py) ------------------------------
    # Proven: a passed probe, a route of the coordinator's own completions, or a client's receipt names it.
    _PROVEN = ("SELECT worker_id FROM probes WHERE problem IS NULL"
               " UNION SELECT w.worker_id FROM workers w JOIN completion_route r ON r.peer_id = w.peer_id"
               " UNION SELECT w.worker_id FROM workers w JOIN receipts r ON r.peer_id = w.peer_id")

    def proven_worker_ids(self) -> set[str]:
        return {r["worker_id"] for r in self._read(self._PROVEN)}

    def unproven_workers(self, registered_since: float) -> tuple[int, float | None]:
        """How many workers registered since ``registered_since`` are not proven, and the oldest registration."""
        row = self._read(
            f"SELECT COUNT(*) AS n, MIN(registered_at) AS oldest FROM workers"
            f" WHERE registered_at >= ? AND worker_id NOT IN ({self._PROVEN})", (registered_since,))[0]
        return int(row["n"]), row["oldest"]

    def probe_stats(self, worker_id: str | None = None) -> dict[str, dict]:
        """Per probed worker (or only ``worker_id``): its last probe's time and how many of its last probes in a
        row went unanswered (no answer at all: error and tokens none; a wrong answer is an answer)."""
        answered = "NOT (error IS NULL AND tokens = 0 AND problem IS NOT NULL)"
        # one worker's view reads its own rows only (the probes_worker index)
        inner, outer, args = (" AND worker_id = ?", " WHERE p.worker_id = ?", (worker_id, worker_id)) if worker_id \
            else ("", "", ())
        rows = self._read(
            "SELECT p.worker_id, MAX(p.at) AS last_at,"
            " SUM(CASE WHEN p.seq > COALESCE(a.seq, 0) THEN 1 ELSE 0 END) AS unanswered FROM probes p"
            f" LEFT JOIN (SELECT worker_id, MAX(seq) AS seq FROM probes WHERE {answered}{inner} GROUP BY worker_id) a"
            f" ON a.worker_id = p.worker_id{outer} GROUP BY p.worker_id", args)
        return {r["worker_id"]: {"last_at": r["last_at"], "unanswered": int(r["unanswered"])} for r in rows}

    # --- observed uptime ----------------------------------------------------------------------------
    def record_online(self, slots: dict[str, int]) -> None:
        """The coordinator saw these workers' spans ONLINE in the DHT in these slots {worker id: slot}
        (coordinator/dht_watch.py, services/uptime.online_slot)."""
        with self._tx() as conn:
            for worker_id, slot in slots.items():
                conn.execute(
                    "INSERT INTO uptime_slots (worker_id, slot, online) VALUES (?, ?, 1)"
                    " ON CONFLICT (worker_id, slot) DO UPDATE SET online = 1",
                    (worker_id, slot),
                )

    def count_slots(self, worker_id: str, online: bool, before: int | None = None,
                    from_slot: int | None = None) -> int:
        """Slots with a counted beat (and, ``online``, the span seen ONLINE), optionally in [from_slot, before)."""
        sql = "SELECT COUNT(*) AS n FROM uptime_slots WHERE worker_id = ? AND beat = 1"
        args: list = [worker_id]
        if online:
            sql += " AND online = 1"
        if before is not None:
            sql, args = sql + " AND slot < ?", [*args, before]
        if from_slot is not None:
            sql, args = sql + " AND slot >= ?", [*args, from_slot]
        return int(self._read(sql, args)[0]["n"])

    def first_slot(self, worker_id: str, online: bool, before: int | None = None) -> int | None:
        """The first slot with a counted beat (and, ``online``, the span seen ONLINE), optionally before ``before``."""
        sql = "SELECT MIN(slot) AS s FROM uptime_slots WHERE worker_id = ? AND beat = 1"
        args: list = [worker_id]
        if online:
            sql += " AND online = 1"
        if before is not None:
            sql, args = sql + " AND slot < ?", [*args, before]
        return self._read(sql, args)[0]["s"]

    # --- ledger -------------------------------------------------------------------------------------
    def add_usage(self, worker_id: str, records: list[dict], now: float, share_of, reliability: float,
                  far_per_token: float) -> list[str]:
        """Store new records once, each with its share (``share_of(start, end)``), the reliability and its claimed
        $FAR (services/ledger.earned_far); returns the ids now on this worker's ledger (new or seen before)."""
        accepted: dict[str, None] = {}  # ordered, once per id even if the batch repeats one
        with self._tx() as conn:
            for r in records:
                share = share_of(r["blocks"][0], r["blocks"][1])
                cur = conn.execute(
                    "INSERT OR IGNORE INTO usage (id, worker_id, session_id, block_start, block_end, tokens,"
                    " steps,"
                    " started_at, ended_at, received_at, share, reliability, earned_far)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r["id"],
                        worker_id,
                        r["session_id"],
                        r["blocks"][0],
                        r["blocks"][1],
                        r["tokens"],
                        r["steps"],
                        r["started_at"],
                        r["ended_at"],
                        now,
                        share,
                        reliability,
                        ledger.earned_far(r["tokens"], share, reliability, far_per_token),
                    ),
                )
                if cur.rowcount == 1:
                    accepted[r["id"]] = None
                else:
                    owner = conn.execute("SELECT worker_id FROM usage WHERE id = ?", (r["id"],)).fetchone()
                    if owner and owner["worker_id"] == worker_id:
                        accepted[r["id"]] = None
        return list(accepted)

    def ledger_totals(self, worker_id: str, since: float, paid_until: float,
                      settled_until: float = float("-inf")) -> dict:
        """One worker's claims (its usage records), the routes of the coordinator's own completions and the probes
        that name it, and direct clients' receipts that name its peer id: tokens and token-blocks of each; claimed
        $FAR in all, received before ``paid_until`` (payable), and of those since ``since``. Routes, probes and
        receipts count only from before ``paid_until`` too (a quarantine freezes what pays), and each price tier of
        the payable claims also sums the $FAR of those received by ``settled_until``."""
        claimed = self._read(
            "SELECT COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(tokens * (block_end - block_start)), 0) AS tb,"
            " COALESCE(SUM(earned_far), 0) AS earned,"
            " COALESCE(SUM(CASE WHEN received_at < ? THEN earned_far ELSE 0 END), 0) AS payable,"
            " COALESCE(SUM(CASE WHEN received_at >= ? AND received_at < ? THEN earned_far ELSE 0 END), 0) AS recent"
            " FROM usage WHERE worker_id = ?",
            (paid_until, since, paid_until, worker_id),
        )[0]
        routed = self._read(
            "SELECT COALESCE(SUM(r.tokens), 0) AS tokens,"
            " COALESCE(SUM(r.tokens * (r.block_end - r.block_start)), 0) AS tb"
            " FROM completion_route r JOIN workers w ON w.peer_id = r.peer_id"
            " JOIN completions c ON c.id = r.completion_id WHERE w.worker_id = ? AND c.created_at < ?",
            (worker_id, paid_until),
        )[0]
        probed = self._read("SELECT COALESCE(SUM(tokens), 0) AS tokens FROM probes WHERE worker_id = ? AND at < ?",
                            (worker_id, paid_until))[0]
        # What a covered token-block is worth differs per record (the reliability when it arrived): paid
        # token-blocks are valued cheapest first, so claims added beside covered ones never raise their worth.
        payable_by_price = self._read(
            "SELECT SUM(tokens * (block_end - block_start)) AS tb, SUM(earned_far) AS far,"
            " SUM(CASE WHEN received_at <= ? THEN earned_far ELSE 0 END) AS settled FROM usage"
            " WHERE worker_id = ? AND received_at < ? AND tokens > 0 AND block_end > block_start"
            " GROUP BY ROUND(earned_far / (tokens * (block_end - block_start)), 15) ORDER BY SUM(earned_far) / SUM("
            "tokens * (block_end - block_start))",
            (settled_until, worker_id, paid_until),
        )
        vouched = self._read(
            "SELECT COALESCE(SUM(r.tokens), 0) AS tokens,"
            " COALESCE(SUM(r.tokens * (r.block_end - r.block_start)), 0) AS tb"
            " FROM receipts r JOIN workers w ON w.peer_id = r.peer_id WHERE w.worker_id = ? AND r.received_at < ?",
            (worker_id, paid_until),
        )[0]
        return {
            "claimed_tokens": int(claimed["tokens"]),
            "claimed_token_blocks": int(claimed["tb"]),
            "claimed_far": float(claimed["earned"]),
            "payable_far": float(claimed["payable"]),
            "payable_far_recent": float(claimed["recent"]),
            "routed_tokens": int(routed["tokens"]),
            "routed_token_blocks": int(routed["tb"]),
            "probed_tokens": int(probed["tokens"]),
            # cheapest first: (token-blocks, $FAR, $FAR settled)
            "payable_by_price": [(int(r["tb"]), float(r["far"]), float(r["settled"])) for r in payable_by_price],
            "vouched_tokens": int(vouched["tokens"]),
            "vouched_token_blocks": int(vouched["tb"]),
        }

    # --- spot checks ----------------------------------------------------------------------------------
    def record_reachability(self, worker_id: str, reachability_json: str) -> None:
        """The last dial of the worker's announced addresses (services/reachability.py); replaces the one before."""
        with self._tx() as conn:
            conn.execute("UPDATE workers SET reachability = ? WHERE worker_id = ?", (reachability_json, worker_id))

    def record_probe(self, worker_id: str, at: float, block: int, tokens: int, error: float | None,
                     tolerance: float, problem: str | None, quarantine: bool) -> None:
        """One probe's outcome; a wrong answer (``quarantine``) also quarantines the worker from ``at`` on."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO probes (worker_id, at, block, tokens, error, tolerance, problem)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (worker_id, at, block, tokens, error, tolerance, problem),
            )
            if quarantine:
                conn.execute("INSERT OR IGNORE INTO quarantine (worker_id, since, reason) VALUES (?, ?, ?)",
                             (worker_id, at, problem))

    def probe_summary(self, worker_id: str) -> dict:
        row = self._read(
            "SELECT COUNT(*) AS n, COALESCE(SUM(problem IS NULL), 0) AS passed, MAX(at) AS last"
            " FROM probes WHERE worker_id = ?",
            (worker_id,),
        )[0]
        last = self._read("SELECT problem FROM probes WHERE worker_id = ? ORDER BY seq DESC LIMIT 1", (worker_id,))
        return {"probes": row["n"], "probes_passed": row["passed"], "last_probe_at": row["last"],
                "last_probe_problem": last[0]["problem"] if last else None}

    def quarantine_of(self, worker_id: str) -> dict | None:
        rows = self._read("SELECT since, reason FROM quarantine WHERE worker_id = ?", (worker_id,))
        return dict(rows[0]) if rows else None

    def quarantined_peers(self) -> set[str]:
        rows = self._read("SELECT w.peer_id FROM quarantine q JOIN workers w ON w.worker_id = q.worker_id")
        return {r["peer_id"] for r in rows}

    def usage_records(self, worker_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM usage", ()
        if worker_id:
            sql, args = sql + " WHERE worker_id = ?", (worker_id,)
        return [dict(r) for r in self._read(sql + " ORDER BY received_at, id", args)]

    # --- receipts -----------------------------------------------------------------------------------
    def add_receipts(self, receipts: list[dict], now: float) -> tuple[list[str], list[str]]:
        """Store verified receipts, each once: returns (ids on the ledger, new or seen before; ids not counted
        because another receipt already vouches for their server session)."""
        accepted: dict[str, None] = {}
        duplicates: dict[str, None] = {}
        with self._tx() as conn:
            for r in receipts:
                known = conn.execute("SELECT id FROM receipts WHERE id = ? OR session_id = ?",
                                     (r["id"], r["session_id"])).fetchall()
                if any(row["id"] == r["id"] for row in known):
                    accepted[r["id"]] = None  # delivered again: counted once already
                elif known:
                    duplicates[r["id"]] = None
                else:
                    conn.execute(
                        "INSERT INTO receipts (id, session_id, peer_id, block_start, block_end, tokens, model,"
                        " client_key_id, created_at, received_at, receipt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (r["id"], r["session_id"], r["peer_id"], r["blocks"][0], r["blocks"][1], r["tokens"],
                         r["model"], r["client_key_id"], r["created_at"], now, json.dumps(r, sort_keys=True)),
                    )
                    accepted[r["id"]] = None
        return list(accepted), list(duplicates)

    # --- completions --------------------------------------------------------------------------------
    def record_completion(
        self,
        completion_id: str,
        now: float,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        route: list[dict],
        key_name: str | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO completions (id, created_at, model, prompt_tokens, completion_tokens)"
                " VALUES (?, ?, ?, ?, ?)",
                (completion_id, now, model, prompt_tokens, completion_tokens),
            )
            if key_name is not None:
                conn.execute("INSERT INTO completion_keys (completion_id, key_name) VALUES (?, ?)",
                             (completion_id, key_name))
            conn.executemany(
                "INSERT INTO completion_route"
                " (completion_id, peer_id, worker_id, block_start, block_end, tokens)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (completion_id, s["peer_id"], s["worker_id"], s["blocks"][0], s["blocks"][1], s["tokens"])
                    for s in route
                ],
            )

    def key_usage(self) -> list[dict]:
        """Per API key: completions asked for and their tokens (the paying side of the ledger)."""
        rows = self._read(
            "SELECT k.key_name, COUNT(*) AS completions, SUM(c.prompt_tokens) AS prompt_tokens,"
            " SUM(c.completion_tokens) AS completion_tokens FROM completion_keys k"
            " JOIN completions c ON c.id = k.completion_id GROUP BY k.key_name ORDER BY k.key_name"
        )
        return [dict(r) for r in rows]

    def completion_routes(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM completion_route ORDER BY rowid")]

    def latest_completions(self, limit: int) -> list[dict]:
        """The newest ``limit`` completions, newest first, each with its route (the mesh page's last routes)."""
        completions = [dict(r) for r in self._read(
            "SELECT id, created_at, model, prompt_tokens, completion_tokens FROM completions"
            " ORDER BY created_at DESC, id LIMIT ?", (limit,))]
        routes: dict[str, list[dict]] = {c["id"]: [] for c in completions}
        if routes:
            marks = ", ".join("?" * len(routes))
            for r in self._read(f"SELECT * FROM completion_route WHERE completion_id IN ({marks}) ORDER BY rowid",
                                tuple(routes)):
                routes[r["completion_id"]].append(dict(r))
        return [{**c, "route": routes[c["id"]]} for c in completions]

    def probes(self, worker_id: str, limit: int) -> list[dict]:
        """A worker's newest ``limit`` probes (and failed routed checks and audits), newest first."""
        return [dict(r) for r in self._read(
            "SELECT at, block, tokens, error, tolerance, problem FROM probes WHERE worker_id = ?"
            " ORDER BY seq DESC LIMIT ?", (worker_id, limit))]

    def counts(self) -> dict[str, int]:
        """Row count per data table (tests check that refused requests stored nothing)."""
        return {t: self._read(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in DATA_TABLES}

    # --- leases: which replica runs the background loops (services/lease.py) -------------------------------------
    # Portable SQL (SQLite >= 3.24 and Postgres): one atomic upsert takes a free or expired lease, or renews our own.
    def take_lease(self, name: str, holder: str, now: float, expires_at: float) -> bool:
        """Hold lease ``name`` until ``expires_at`` if it is free, expired at ``now`` or ours; True if we hold it."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at"
                " WHERE leases.expires_at < ? OR leases.holder = excluded.holder",
                (name, holder, expires_at, now),
            )
            row = conn.execute("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
        return row is not None and row["holder"] == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", (name, holder))

    def lease(self, name: str) -> dict | None:
        """{"holder", "expires_at"} of lease ``name``; None if nobody ever took it."""
        rows = self._read("SELECT holder, expires_at FROM leases WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None


_LEASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""
