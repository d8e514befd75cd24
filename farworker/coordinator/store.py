"""The coordinator's ledger storage, SQL only (the rules deciding what to store live in services/): SQLite, a file
path and the embedded default, or Postgres, a postgresql:// URL and the store several coordinators share.

SQLAlchemy Core runs the same SQL on both: text() with named parameters, in the subset both speak (ON CONFLICT,
RETURNING, CASE); the one difference is Postgres' row lock (FOR NO KEY UPDATE), which SQLite's single writer makes
moot.
The schema is versioned by Alembic (migrations/) and brought to head on start; a pre-Alembic SQLite ledger migrates
in place. SQLite: one connection behind a lock, WAL, synchronous=FULL, writes in BEGIN IMMEDIATE (as before).
Postgres: a connection pool. Either way every write that belongs to one request is one transaction, and what two
requests (or two coordinators) racing on the same key store is decided by a unique key (INSERT ... ON CONFLICT,
then the row count), never by a check-then-insert.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy.pool import StaticPool

from farworker.coordinator import migrations
from farworker.coordinator.errors import StoreFull
from farworker.coordinator.services import ledger
from farworker.coordinator.settings import display_target, is_database_url
from farworker.coordinator.write_refusals import WriteRefusals

HEARTBEAT_HISTORY = 500  # kept per worker; older beats only live on as counts

# Every table in the order foreign keys allow inserting them (copy_from), nonces too: a copy taken while
# workers are live must still refuse a replay inside the signature window.
COPY_ORDER = ("workers", "heartbeats", "nonces", "usage", "completions", "completion_keys", "completion_route",
              "probes", "receipts", "uptime_slots", "quarantine")
DATA_TABLES = tuple(table for table in COPY_ORDER if table != "nonces")  # the ledger's data (counts())
MIGRATION_LOCK = 0x6661726C65646772  # pg_advisory_xact_lock key: replicas starting at once migrate one at a time
# A statement's text() parsed once (its bind parameters found by a regex), not at every call.
_sql = functools.lru_cache(maxsize=512)(text)
POSTGRES_POOL = {"pool_size": 10, "max_overflow": 20, "pool_timeout": 30, "pool_pre_ping": True}


def postgres_url(target: str) -> sa.URL:
    """``target`` for SQLAlchemy with psycopg 3 (a bare postgresql:// would pick psycopg2); ValueError naming
    what is accepted for any other URL."""
    try:
        url = sa.make_url(target)
    except sa.exc.ArgumentError as err:
        raise ValueError(f"--db {target!r}: not a URL ({err})") from None
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(f"--db accepts a SQLite file path or a postgresql:// URL, got a {url.drivername}:// URL")
    return url.set(drivername="postgresql+psycopg")


def _sqlite_engine(path: Path) -> sa.Engine:
    """One connection (StaticPool; the store's lock serialises its use), WAL, synchronous=FULL, autocommit driver
    with the transactions the store opens: BEGIN IMMEDIATE for writes (the write lock from the start, so two
    processes on one file never deadlock upgrading a read lock), a plain BEGIN for reads."""
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=StaticPool,
                              connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=FULL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")  # a reconnection too (the store's migration turns it off)

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("farworker_read") else "BEGIN IMMEDIATE")

    return engine


LOW_SPACE_BYTES = 1 << 20  # an I/O error while the database's file system has less free than this: it is full


def store_full(err: BaseException, path: Path | None) -> StoreFull | None:
    """The write refused for want of space, as StoreFull; None for any other error. SQLite says SQLITE_FULL when a
    write to the database, its WAL or journal hits ENOSPC; growing the WAL's shared-memory index gives an I/O error
    instead (SQLITE_IOERR_SHMSIZE and kin), taken as "full" when the file system of ``path`` has no space left.
    Postgres says disk_full (SQLSTATE 53100). SQLAlchemy hands the driver's error as ``orig``."""
    err = getattr(err, "orig", None) or err
    if getattr(err, "sqlstate", None) == "53100":  # psycopg's DiskFull: the server's disk
        return StoreFull(f"{str(err).strip().splitlines()[0]} (the Postgres server's disk)")
    if path is None or not isinstance(err, sqlite3.OperationalError):
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
    def __init__(self, target: str | os.PathLike):
        """``target``: a SQLite file path, or a postgresql:// URL."""
        self.postgres = is_database_url(target)
        self._closed = False
        self.write_refusals = WriteRefusals()
        if self.postgres:
            self.path = str(target)
            self._engine = sa.create_engine(postgres_url(self.path), **POSTGRES_POOL)
            self._lock = contextlib.nullcontext()  # the pool gives each thread its own connection
            # the worker's row for a heartbeat: NO KEY UPDATE (as its UPDATE takes anyway) serialises two beats
            # but not the foreign key checks of usage and uptime-slot inserts (KEY SHARE), which FOR UPDATE would
            # block, and a DHT watch recording several workers' slots at once could then deadlock with a beat
            self._for_update = " FOR NO KEY UPDATE"
        else:
            self.path = Path(target)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._engine = _sqlite_engine(self.path)
            self._lock = threading.Lock()
            self._for_update = ""  # BEGIN IMMEDIATE already holds the database's one write lock
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    def _migrate(self) -> None:
        if not self.postgres:  # as before: a migration that rebuilds a table runs with foreign keys off
            self._sqlite_pragma("PRAGMA foreign_keys=OFF")
        with self._lock, self._engine.begin() as conn:
            if self.postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            migrations.upgrade_to_head(conn)
        if not self.postgres:
            self._sqlite_pragma("PRAGMA foreign_keys=ON")

    def _sqlite_pragma(self, pragma: str) -> None:
        """On the one connection, outside a transaction (where SQLite ignores foreign_keys)."""
        raw = self._engine.raw_connection()
        try:
            raw.driver_connection.execute(pragma)
        finally:
            raw.close()

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at."""
        with self._lock, self._engine.connect().execution_options(farworker_read=True) as conn:
            return migrations.current_revision(conn)

    def close(self) -> None:
        """Final: a closed store refuses every later read and write (a disposed engine alone would reconnect)."""
        with self._lock:
            self._closed = True
            self._engine.dispose()

    def _open(self) -> None:
        if self._closed:
            raise sa.exc.ResourceClosedError("the ledger store is closed")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """One write transaction (under the lock on SQLite). A write refused for want of space (disk full) is rolled
        back whole and raised as StoreFull; the next transaction starts clean, so writes resume once there is space."""
        with self._lock:
            self._open()
            try:
                with self._engine.begin() as conn:
                    yield conn
            except sa.exc.DBAPIError as err:  # at BEGIN, in a statement or at COMMIT; rolled back by then
                full = self._refused(err)
                if full is None:
                    raise
                raise full from err
        self.write_refusals.accepted()

    def _refused(self, err: BaseException) -> StoreFull | None:
        full = store_full(err, None if self.postgres else self.path)
        if full is not None:
            self.write_refusals.refused(full.reason)
        return full

    def _read(self, sql: str, args: dict | None = None) -> list[sa.RowMapping]:
        self._open()
        with self._lock, self._engine.connect().execution_options(farworker_read=True) as conn:
            return conn.execute(_sql(sql), args or {}).mappings().all()

    # --- auth ---------------------------------------------------------------------------------------
    def public_key_of(self, peer_id: str) -> str | None:
        rows = self._read("SELECT public_key FROM workers WHERE peer_id = :peer", {"peer": peer_id})
        return rows[0]["public_key"] if rows else None

    def consume_nonce(self, peer_id: str, nonce: str, now: float, keep_s: float) -> bool:
        """Remember ``nonce``; False if it was seen before. Nonces older than ``keep_s`` are forgotten:
        the timestamp window refuses their requests anyway. One insert decides: of two requests racing with the
        same nonce (two replicas), the second waits for the first's row and inserts nothing."""
        with self._tx() as conn:
            conn.execute(_sql("DELETE FROM nonces WHERE seen_at < :before"), {"before": now - keep_s})
            inserted = conn.execute(
                _sql("INSERT INTO nonces (peer_id, nonce, seen_at) VALUES (:peer, :nonce, :now)"
                     " ON CONFLICT (peer_id, nonce) DO NOTHING"),
                {"peer": peer_id, "nonce": nonce, "now": now},
            ).rowcount
        return inserted == 1

    # --- workers ------------------------------------------------------------------------------------
    def register(self, req: dict, now: float, interval: float) -> str:
        """Insert or refresh the worker of ``req['peer_id']``; its worker id survives restarts. One upsert on the
        peer id: two registrations racing on two replicas give one worker."""
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
        updates = ", ".join(f"{k} = excluded.{k}" for k in fields)
        fields.update(worker_id=f"w-{uuid.uuid4().hex[:16]}", peer_id=req["peer_id"], registered_at=now)
        with self._tx() as conn:
            return conn.execute(
                _sql(f"INSERT INTO workers ({', '.join(fields)}) VALUES ({', '.join(':' + k for k in fields)})"
                     f" ON CONFLICT (peer_id) DO UPDATE SET {updates} RETURNING worker_id"),
                fields,
            ).scalar_one()

    def worker_row(self, worker_id: str) -> dict | None:
        rows = self._read("SELECT * FROM workers WHERE worker_id = :w", {"w": worker_id})
        return dict(rows[0]) if rows else None

    def heartbeat(self, worker_id: str, payload: dict, now: float) -> None:
        """Store a beat, and the uptime slot it counts for (services/ledger.beat_slot decides, in this transaction;
        on Postgres the worker's row is locked meanwhile, so two beats racing on two replicas count one slot)."""
        with self._tx() as conn:
            row = conn.execute(
                _sql("SELECT counted_beat_at, heartbeat_interval, registered_at FROM workers WHERE worker_id = :w"
                     + self._for_update),
                {"w": worker_id},
            ).mappings().one()
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
            assignments = ", ".join(f"{k} = :{k}" for k in updates)
            extra = ", heartbeat_count = heartbeat_count + 1, counted_beat_at = :now" if counts else ""
            conn.execute(_sql(f"UPDATE workers SET {assignments}{extra} WHERE worker_id = :w"),
                         {**updates, "now": now, "w": worker_id})
            if counts:  # the slot itself too: with a mesh view, uptime needs the beat and the DHT in one slot
                conn.execute(
                    _sql("INSERT INTO uptime_slots (worker_id, slot, beat) VALUES (:w, :slot, 1)"
                         " ON CONFLICT (worker_id, slot) DO UPDATE SET beat = 1"),
                    {"w": worker_id, "slot": counted_slot},
                )
            conn.execute(
                _sql("INSERT INTO heartbeats (worker_id, received_at, payload) VALUES (:w, :now, :payload)"),
                {"w": worker_id, "now": now, "payload": json.dumps(payload)},
            )
            conn.execute(
                _sql("DELETE FROM heartbeats WHERE worker_id = :w AND seq <= "
                     "(SELECT seq FROM heartbeats WHERE worker_id = :w ORDER BY seq DESC LIMIT 1 OFFSET :keep)"),
                {"w": worker_id, "keep": HEARTBEAT_HISTORY},
            )

    def heartbeats(self, worker_id: str) -> list[dict]:
        rows = self._read(
            "SELECT received_at, payload FROM heartbeats WHERE worker_id = :w ORDER BY seq", {"w": worker_id}
        )
        return [{"received_at": r["received_at"], **json.loads(r["payload"])} for r in rows]

    def set_state(self, worker_id: str, state: str) -> None:
        with self._tx() as conn:
            conn.execute(_sql("UPDATE workers SET state = :state WHERE worker_id = :w"),
                         {"state": state, "w": worker_id})

    def worker_ids(self) -> list[str]:
        return [r["worker_id"] for r in self._read("SELECT worker_id FROM workers ORDER BY registered_at")]

    def worker_rows(self) -> list[dict]:
        """Every worker's row, in registration order (one query: the lists and loops read them all)."""
        return [dict(r) for r in self._read("SELECT * FROM workers ORDER BY registered_at, worker_id")]

    def worker_by_peer(self, peer_id: str) -> str | None:
        rows = self._read("SELECT worker_id FROM workers WHERE peer_id = :peer", {"peer": peer_id})
        return rows[0]["worker_id"] if rows else None

    def worker_rows_page(self, after: tuple[float, str] | None, limit: int) -> list[dict]:
        """At most ``limit`` workers in registration order (then worker id), after ``(registered_at, worker_id)``."""
        sql, args = "SELECT * FROM workers", {"limit": limit}
        if after is not None:
            sql += " WHERE (registered_at, worker_id) > (:at, :id)"
            args.update(at=after[0], id=after[1])
        return [dict(r) for r in self._read(sql + " ORDER BY registered_at, worker_id LIMIT :limit", args)]

    _NO_HOST = "CASE WHEN host_id IS NULL THEN 1 ELSE 0 END"

    def host_keys_page(self, after: tuple[int, str] | None, limit: int) -> list[tuple[int, str]]:
        """At most ``limit`` hosts as (0, host id), then (1, "") for the workers that sent no host id, after
        ``after``."""
        sql = f"SELECT DISTINCT {self._NO_HOST} AS no_host, COALESCE(host_id, '') AS host FROM workers"
        args: dict = {"limit": limit}
        if after is not None:
            sql += f" WHERE ({self._NO_HOST}, COALESCE(host_id, '')) > (:no_host, :host)"
            args.update(no_host=after[0], host=after[1])
        rows = self._read(sql + " ORDER BY no_host, host LIMIT :limit", args)
        return [(int(r["no_host"]), r["host"]) for r in rows]

    def worker_rows_of_hosts(self, host_ids: list[str], no_host: bool) -> list[dict]:
        """The workers registered with these host ids (and, ``no_host``, those that sent none)."""
        marks = ", ".join(f":h{i}" for i in range(len(host_ids)))
        where = [f"host_id IN ({marks})"] if host_ids else []
        if no_host:
            where.append("host_id IS NULL")
        if not where:
            return []
        sql = "SELECT * FROM workers WHERE " + " OR ".join(where) + " ORDER BY registered_at, worker_id"
        return [dict(r) for r in self._read(sql, {f"h{i}": h for i, h in enumerate(host_ids)})]

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
            f" WHERE registered_at >= :since AND worker_id NOT IN ({self._PROVEN})", {"since": registered_since})[0]
        return int(row["n"]), row["oldest"]

    def probe_stats(self, worker_id: str | None = None) -> dict[str, dict]:
        """Per probed worker (or only ``worker_id``): its last probe's time and how many of its last probes in a
        row went unanswered (no answer at all: error and tokens none; a wrong answer is an answer)."""
        answered = "NOT (error IS NULL AND tokens = 0 AND problem IS NOT NULL)"
        # one worker's view reads its own rows only (the probes_worker index)
        inner, outer = (" AND worker_id = :w", " WHERE p.worker_id = :w") if worker_id else ("", "")
        rows = self._read(
            "SELECT p.worker_id, MAX(p.at) AS last_at,"
            " SUM(CASE WHEN p.seq > COALESCE(a.seq, 0) THEN 1 ELSE 0 END) AS unanswered FROM probes p"
            f" LEFT JOIN (SELECT worker_id, MAX(seq) AS seq FROM probes WHERE {answered}{inner} GROUP BY worker_id) a"
            f" ON a.worker_id = p.worker_id{outer} GROUP BY p.worker_id", {"w": worker_id} if worker_id else {})
        return {r["worker_id"]: {"last_at": r["last_at"], "unanswered": int(r["unanswered"])} for r in rows}

    # --- observed uptime ----------------------------------------------------------------------------
    def record_online(self, slots: dict[str, int]) -> None:
        """The coordinator saw these workers' spans ONLINE in the DHT in these slots {worker id: slot}
        (coordinator/dht_watch.py, services/uptime.online_slot)."""
        if not slots:
            return
        with self._tx() as conn:
            conn.execute(
                _sql("INSERT INTO uptime_slots (worker_id, slot, online) VALUES (:w, :slot, 1)"
                     " ON CONFLICT (worker_id, slot) DO UPDATE SET online = 1"),
                [{"w": worker_id, "slot": slot} for worker_id, slot in slots.items()],
            )

    def record_throughput(self, throughputs: dict[str, float]) -> None:
        """The throughput these workers announce in the DHT now {worker id: figure} (coordinator/dht_watch.py)."""
        if not throughputs:
            return
        with self._tx() as conn:
            conn.execute(_sql("UPDATE workers SET announced_throughput = :t WHERE worker_id = :w"),
                         [{"w": worker_id, "t": t} for worker_id, t in throughputs.items()])

    @staticmethod
    def _slots_where(worker_id: str, online: bool, before: int | None, from_slot: int | None) -> tuple[str, dict]:
        """Slots with a counted beat (and, ``online``, the span seen ONLINE), optionally in [from_slot, before)."""
        sql, args = " FROM uptime_slots WHERE worker_id = :w AND beat = 1", {"w": worker_id}
        if online:
            sql += " AND online = 1"
        if before is not None:
            sql, args["before"] = sql + " AND slot < :before", before
        if from_slot is not None:
            sql, args["from_slot"] = sql + " AND slot >= :from_slot", from_slot
        return sql, args

    def count_slots(self, worker_id: str, online: bool, before: int | None = None,
                    from_slot: int | None = None) -> int:
        """How many slots _slots_where selects."""
        where, args = self._slots_where(worker_id, online, before, from_slot)
        return int(self._read("SELECT COUNT(*) AS n" + where, args)[0]["n"])

    def first_slot(self, worker_id: str, online: bool, before: int | None = None) -> int | None:
        """The first slot _slots_where selects."""
        where, args = self._slots_where(worker_id, online, before, None)
        return self._read("SELECT MIN(slot) AS s" + where, args)[0]["s"]

    # --- ledger -------------------------------------------------------------------------------------
    def add_usage(self, worker_id: str, records: list[dict], now: float, share_of, reliability: float,
                  far_per_token: float) -> list[str]:
        """Store new records once, each with its share (``share_of(start, end)``), the reliability and its claimed
        $FAR (services/ledger.earned_far); returns the ids now on this worker's ledger (new or seen before). The id
        is the unique key: of one record sent to two replicas at once, the insert that comes second stores
        nothing (it waits for the first's row) and finds the first's."""
        accepted: dict[str, None] = {}  # ordered, once per id even if the batch repeats one
        with self._tx() as conn:
            for r in records:
                share = share_of(r["blocks"][0], r["blocks"][1])
                inserted = conn.execute(
                    _sql("INSERT INTO usage (id, worker_id, session_id, block_start, block_end, tokens, steps,"
                         " started_at, ended_at, received_at, share, reliability, earned_far)"
                         " VALUES (:id, :w, :session, :start, :end, :tokens, :steps, :started, :ended, :now, :share,"
                         " :reliability, :far) ON CONFLICT (id) DO NOTHING"),
                    {"id": r["id"], "w": worker_id, "session": r["session_id"], "start": r["blocks"][0],
                     "end": r["blocks"][1], "tokens": r["tokens"], "steps": r["steps"], "started": r["started_at"],
                     "ended": r["ended_at"], "now": now, "share": share, "reliability": reliability,
                     "far": ledger.earned_far(r["tokens"], share, reliability, far_per_token)},
                ).rowcount
                if inserted == 1:
                    accepted[r["id"]] = None
                else:
                    owner = conn.execute(_sql("SELECT worker_id FROM usage WHERE id = :id"), {"id": r["id"]}).first()
                    if owner and owner.worker_id == worker_id:
                        accepted[r["id"]] = None
        return list(accepted)

    def ledger_totals(self, worker_id: str, since: float, paid_until: float,
                      settled_until: float = float("-inf")) -> dict:
        """One worker's claims (its usage records), the routes of the coordinator's own completions and the probes
        that name it, and direct clients' receipts that name its peer id: tokens and token-blocks of each; claimed
        $FAR in all, received before ``paid_until`` (payable), and of those since ``since``. Routes, probes and
        receipts count only from before ``paid_until`` too (a quarantine freezes what pays), and each price tier of
        the payable claims also sums the $FAR of those received by ``settled_until``."""
        args = {"w": worker_id, "since": since, "paid_until": paid_until, "settled_until": settled_until}
        claimed = self._read(
            "SELECT COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(tokens * (block_end - block_start)), 0) AS tb,"
            " COALESCE(SUM(earned_far), 0) AS earned,"
            " COALESCE(SUM(CASE WHEN received_at < :paid_until THEN earned_far ELSE 0 END), 0) AS payable,"
            " COALESCE(SUM(CASE WHEN received_at >= :since AND received_at < :paid_until THEN earned_far ELSE 0 END),"
            " 0) AS recent FROM usage WHERE worker_id = :w",
            args,
        )[0]
        routed = self._read(
            "SELECT COALESCE(SUM(r.tokens), 0) AS tokens,"
            " COALESCE(SUM(r.tokens * (r.block_end - r.block_start)), 0) AS tb"
            " FROM completion_route r JOIN workers w ON w.peer_id = r.peer_id"
            " JOIN completions c ON c.id = r.completion_id WHERE w.worker_id = :w AND c.created_at < :paid_until",
            args,
        )[0]
        probed = self._read(
            "SELECT COALESCE(SUM(tokens), 0) AS tokens FROM probes WHERE worker_id = :w AND at < :paid_until", args
        )[0]
        # What a covered token-block is worth differs per record (the reliability when it arrived): paid
        # token-blocks are valued cheapest first, so claims added beside covered ones never raise their worth.
        # (ROUND over NUMERIC: Postgres has no two-argument ROUND of a double.)
        payable_by_price = self._read(
            "SELECT SUM(tokens * (block_end - block_start)) AS tb, SUM(earned_far) AS far,"
            " SUM(CASE WHEN received_at <= :settled_until THEN earned_far ELSE 0 END) AS settled FROM usage"
            " WHERE worker_id = :w AND received_at < :paid_until AND tokens > 0 AND block_end > block_start"
            " GROUP BY ROUND(CAST(earned_far / (tokens * (block_end - block_start)) AS NUMERIC), 15)"
            " ORDER BY SUM(earned_far) / SUM(tokens * (block_end - block_start))",
            args,
        )
        vouched = self._read(
            "SELECT COALESCE(SUM(r.tokens), 0) AS tokens,"
            " COALESCE(SUM(r.tokens * (r.block_end - r.block_start)), 0) AS tb"
            " FROM receipts r JOIN workers w ON w.peer_id = r.peer_id"
            " WHERE w.worker_id = :w AND r.received_at < :paid_until",
            args,
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
            conn.execute(_sql("UPDATE workers SET reachability = :r WHERE worker_id = :w"),
                         {"r": reachability_json, "w": worker_id})

    def record_probe(self, worker_id: str, at: float, block: int, tokens: int, error: float | None,
                     tolerance: float, problem: str | None, quarantine: bool) -> None:
        """One probe's outcome; a wrong answer (``quarantine``) also quarantines the worker from ``at`` on."""
        with self._tx() as conn:
            conn.execute(
                _sql("INSERT INTO probes (worker_id, at, block, tokens, error, tolerance, problem)"
                     " VALUES (:w, :at, :block, :tokens, :error, :tolerance, :problem)"),
                {"w": worker_id, "at": at, "block": block, "tokens": tokens, "error": error,
                 "tolerance": tolerance, "problem": problem},
            )
            if quarantine:
                conn.execute(_sql("INSERT INTO quarantine (worker_id, since, reason) VALUES (:w, :at, :problem)"
                                  " ON CONFLICT (worker_id) DO NOTHING"),
                             {"w": worker_id, "at": at, "problem": problem})

    def probe_summary(self, worker_id: str) -> dict:
        row = self._read(
            "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN problem IS NULL THEN 1 ELSE 0 END), 0) AS passed,"
            " MAX(at) AS last FROM probes WHERE worker_id = :w",
            {"w": worker_id},
        )[0]
        last = self._read("SELECT problem FROM probes WHERE worker_id = :w ORDER BY seq DESC LIMIT 1",
                          {"w": worker_id})
        return {"probes": int(row["n"]), "probes_passed": int(row["passed"]), "last_probe_at": row["last"],
                "last_probe_problem": last[0]["problem"] if last else None}

    def quarantine_of(self, worker_id: str) -> dict | None:
        rows = self._read("SELECT since, reason FROM quarantine WHERE worker_id = :w", {"w": worker_id})
        return dict(rows[0]) if rows else None

    def quarantined_peers(self) -> set[str]:
        rows = self._read("SELECT w.peer_id FROM quarantine q JOIN workers w ON w.worker_id = q.worker_id")
        return {r["peer_id"] for r in rows}

    def usage_records(self, worker_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM usage", {}
        if worker_id:
            sql, args = sql + " WHERE worker_id = :w", {"w": worker_id}
        return [dict(r) for r in self._read(sql + " ORDER BY received_at, id", args)]

    # --- receipts -----------------------------------------------------------------------------------
    def add_receipts(self, receipts: list[dict], now: float) -> tuple[list[str], list[str]]:
        """Store verified receipts, each once: returns (ids on the ledger, new or seen before; ids not counted
        because another receipt already vouches for their server session). The receipt id and the session id are
        unique keys: the insert decides (a racing copy waits for the first and stores nothing), then the id tells a
        delivery seen before from another receipt for the same session."""
        accepted: dict[str, None] = {}
        duplicates: dict[str, None] = {}
        with self._tx() as conn:
            for r in receipts:
                inserted = conn.execute(
                    _sql("INSERT INTO receipts (id, session_id, peer_id, block_start, block_end, tokens, model,"
                         " client_key_id, created_at, received_at, receipt) VALUES (:id, :session, :peer, :start,"
                         " :end, :tokens, :model, :client, :created, :now, :receipt) ON CONFLICT DO NOTHING"),
                    {"id": r["id"], "session": r["session_id"], "peer": r["peer_id"], "start": r["blocks"][0],
                     "end": r["blocks"][1], "tokens": r["tokens"], "model": r["model"], "client": r["client_key_id"],
                     "created": r["created_at"], "now": now, "receipt": json.dumps(r, sort_keys=True)},
                ).rowcount
                if inserted == 1 or conn.execute(_sql("SELECT 1 FROM receipts WHERE id = :id"),
                                                 {"id": r["id"]}).first():
                    accepted[r["id"]] = None  # new, or delivered again: counted once
                else:
                    duplicates[r["id"]] = None
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
    ) -> bool:
        """The completion, its API key and its route, once per id: False (and nothing stored) if the id is on the
        ledger already, so a completion recorded twice attests its route once."""
        with self._tx() as conn:
            inserted = conn.execute(
                _sql("INSERT INTO completions (id, created_at, model, prompt_tokens, completion_tokens)"
                     " VALUES (:id, :now, :model, :prompt, :completion) ON CONFLICT (id) DO NOTHING"),
                {"id": completion_id, "now": now, "model": model, "prompt": prompt_tokens,
                 "completion": completion_tokens},
            ).rowcount
            if inserted != 1:
                return False
            if key_name is not None:
                conn.execute(_sql("INSERT INTO completion_keys (completion_id, key_name) VALUES (:id, :key)"),
                             {"id": completion_id, "key": key_name})
            if route:
                conn.execute(
                    _sql("INSERT INTO completion_route (completion_id, peer_id, worker_id, block_start, block_end,"
                         " tokens) VALUES (:id, :peer, :w, :start, :end, :tokens)"),
                    [{"id": completion_id, "peer": s["peer_id"], "w": s["worker_id"], "start": s["blocks"][0],
                      "end": s["blocks"][1], "tokens": s["tokens"]} for s in route],
                )
        return True

    def key_usage(self) -> list[dict]:
        """Per API key: completions asked for and their tokens (the paying side of the ledger)."""
        rows = self._read(
            "SELECT k.key_name, COUNT(*) AS completions, SUM(c.prompt_tokens) AS prompt_tokens,"
            " SUM(c.completion_tokens) AS completion_tokens FROM completion_keys k"
            " JOIN completions c ON c.id = k.completion_id GROUP BY k.key_name ORDER BY k.key_name"
        )
        return [{"key_name": r["key_name"], "completions": int(r["completions"]),
                 "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"])}
                for r in rows]

    def completion_routes(self) -> list[dict]:
        """Every route segment, by completion (oldest first), each completion's in the order of its blocks."""
        rows = self._read(
            "SELECT r.completion_id, r.peer_id, r.worker_id, r.block_start, r.block_end, r.tokens"
            " FROM completion_route r JOIN completions c ON c.id = r.completion_id"
            " ORDER BY c.created_at, r.completion_id, r.block_start, r.peer_id"
        )
        return [dict(r) for r in rows]

    def latest_completions(self, limit: int) -> list[dict]:
        """The newest ``limit`` completions, newest first, each with its route (the mesh page's last routes)."""
        completions = [dict(r) for r in self._read(
            "SELECT id, created_at, model, prompt_tokens, completion_tokens FROM completions"
            " ORDER BY created_at DESC, id LIMIT :limit", {"limit": limit})]
        routes: dict[str, list[dict]] = {c["id"]: [] for c in completions}
        if routes:
            marks = ", ".join(f":c{i}" for i in range(len(routes)))
            for r in self._read(f"SELECT * FROM completion_route WHERE completion_id IN ({marks})"
                                " ORDER BY block_start, peer_id", {f"c{i}": c for i, c in enumerate(routes)}):
                routes[r["completion_id"]].append(dict(r))
        return [{**c, "route": routes[c["id"]]} for c in completions]

    def probes(self, worker_id: str, limit: int) -> list[dict]:
        """A worker's newest ``limit`` probes (and failed routed checks and audits), newest first."""
        return [dict(r) for r in self._read(
            "SELECT at, block, tokens, error, tolerance, problem FROM probes WHERE worker_id = :w"
            " ORDER BY seq DESC LIMIT :limit", {"w": worker_id, "limit": limit})]

    def counts(self) -> dict[str, int]:
        """Row count per data table (tests check that refused requests stored nothing)."""
        return {t: int(self._read(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"]) for t in DATA_TABLES}

    # --- moving a ledger (`farworker coordinator copy-ledger`) --------------------------------------
    def copy_from(self, source: Store, batch: int = 5000) -> None:
        """Copy every row of ``source`` into this store, in one transaction; ValueError if this one holds data
        (a copy goes into a fresh database, never on top of a ledger)."""
        if any(self.counts().values()):
            raise ValueError(f"{display_target(self.path)} already holds a ledger; copy into an empty database")
        with self._tx() as target:
            for table in COPY_ORDER:
                with source._lock, source._engine.connect().execution_options(farworker_read=True) as conn:
                    rows = conn.execute(_sql(f"SELECT * FROM {table}")).mappings()
                    while chunk := rows.fetchmany(batch):
                        names = list(chunk[0].keys())
                        target.execute(
                            _sql(f"INSERT INTO {table} ({', '.join(names)})"
                                 f" VALUES ({', '.join(':' + n for n in names)})"),
                            [dict(r) for r in chunk],
                        )
            if self.postgres:  # rows came with their seq: the sequences continue after the highest
                for table in ("heartbeats", "probes"):
                    target.execute(_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'),"
                                        f" COALESCE((SELECT MAX(seq) FROM {table}), 0) + 1, false)"))

    def totals(self) -> dict[str, float]:
        """What a copied ledger must match: rows per table, and the sums of its tokens and $FAR."""
        figures: dict[str, float] = {f"{t} rows": n for t, n in self.counts().items()}
        sums = (("usage", "tokens"), ("usage", "earned_far"), ("completion_route", "tokens"), ("probes", "tokens"),
                ("receipts", "tokens"), ("completions", "completion_tokens"), ("uptime_slots", "beat"),
                ("uptime_slots", "online"), ("workers", "heartbeat_count"))
        for table, column in sums:
            value = self._read(f"SELECT COALESCE(SUM({column}), 0) AS s FROM {table}")[0]["s"]
            figures[f"{table} {column}"] = float(value) if column == "earned_far" else int(value)
        return figures


    # --- leases: which replica runs the background loops (services/lease.py) -------------------------------------
    # One atomic upsert takes a free or expired lease, or renews our own (ON CONFLICT ... WHERE: SQLite and Postgres).
    def take_lease(self, name: str, holder: str, now: float, expires_at: float) -> bool:
        """Hold lease ``name`` until ``expires_at`` if it is free, expired at ``now`` or ours; True if we hold it."""
        with self._tx() as conn:
            conn.execute(_sql(
                "INSERT INTO leases (name, holder, expires_at) VALUES (:name, :holder, :until)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at"
                " WHERE leases.expires_at < :now OR leases.holder = excluded.holder"),
                {"name": name, "holder": holder, "until": expires_at, "now": now})
            row = conn.execute(_sql("SELECT holder FROM leases WHERE name = :name"), {"name": name}).first()
        return row is not None and row.holder == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute(_sql("UPDATE leases SET expires_at = 0 WHERE name = :name AND holder = :holder"),
                         {"name": name, "holder": holder})

    def lease(self, name: str) -> dict | None:
        """{"holder", "expires_at"} of lease ``name``; None if nobody ever took it."""
        rows = self._read("SELECT holder, expires_at FROM leases WHERE name = :name", {"name": name})
        return dict(rows[0]) if rows else None
