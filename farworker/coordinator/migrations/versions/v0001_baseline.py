"""Baseline: the ledger as the pre-Alembic store made it, on SQLite or Postgres.

A SQLite ledger written before versioning (tables made on start, no alembic_version) is brought to this
revision in place: the store then made its tables with CREATE TABLE IF NOT EXISTS and patched older ones
(_allow_unknown_blocks, _add_host_columns, _add_reachability_column); the same steps run here once.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Types chosen for both backends: Double is Postgres' double precision (its REAL is 4 bytes: money and unix
# times need 8) and SQLite's REAL; token counts are BigInteger so token x blocks sums cannot overflow on Postgres;
# a sequence column is Postgres' bigserial and SQLite's INTEGER PRIMARY KEY AUTOINCREMENT (the rowid).
Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def baseline_tables(metadata: sa.MetaData) -> None:
    sa.Table(
        "workers", metadata,
        sa.Column("worker_id", sa.Text, primary_key=True),
        sa.Column("peer_id", sa.Text, nullable=False, unique=True),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("wallet_address", sa.Text, nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("block_start", sa.Integer),  # NULL until the worker knows its span (registered before loading it)
        sa.Column("block_end", sa.Integer),
        sa.Column("total_blocks", sa.Integer),
        sa.Column("torch_dtype", sa.Text, nullable=False),
        sa.Column("quant_type", sa.Text, nullable=False),
        sa.Column("location", sa.Text, nullable=False),
        sa.Column("farworker_version", sa.Text, nullable=False),
        sa.Column("announce_maddrs", sa.Text, nullable=False),
        sa.Column("hardware", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("registered_at", sa.Double, nullable=False),
        sa.Column("last_registered_at", sa.Double, nullable=False),
        sa.Column("heartbeat_interval", sa.Double, nullable=False),
        sa.Column("heartbeat_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("counted_beat_at", sa.Double),
        sa.Column("last_heartbeat_at", sa.Double),
        sa.Column("last_heartbeat", sa.Text),
        sa.Column("host_id", sa.Text),  # NULL from workers before multi-GPU hosts (and from any that send none)
        sa.Column("instance", sa.Integer),
        # JSON {"at", "tried": {address: null or why not}} of the last dial; NULL: not dialled yet
        sa.Column("reachability", sa.Text),
    )
    sa.Table(
        "heartbeats", metadata,
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("worker_id", sa.Text, sa.ForeignKey("workers.worker_id"), nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Index("heartbeats_worker", "worker_id", "seq"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "nonces", metadata,
        sa.Column("peer_id", sa.Text, primary_key=True),
        sa.Column("nonce", sa.Text, primary_key=True),
        sa.Column("seen_at", sa.Double, nullable=False),
        sa.Index("nonces_seen", "seen_at"),
    )
    sa.Table(
        "usage", metadata,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("worker_id", sa.Text, sa.ForeignKey("workers.worker_id"), nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("block_start", sa.Integer, nullable=False),
        sa.Column("block_end", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("steps", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("ended_at", sa.Double, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("share", sa.Double, nullable=False),
        sa.Column("reliability", sa.Double, nullable=False),
        sa.Column("earned_far", sa.Double, nullable=False),
        sa.Index("usage_worker", "worker_id", "received_at"),
    )
    sa.Table(
        "completions", metadata,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    )
    sa.Table(  # which API key asked for a completion (keys configured)
        "completion_keys", metadata,
        sa.Column("completion_id", sa.Text, sa.ForeignKey("completions.id"), primary_key=True),
        sa.Column("key_name", sa.Text, nullable=False),
    )
    sa.Table(
        "completion_route", metadata,
        sa.Column("completion_id", sa.Text, sa.ForeignKey("completions.id"), nullable=False),
        sa.Column("peer_id", sa.Text, nullable=False),
        sa.Column("worker_id", sa.Text),
        sa.Column("block_start", sa.Integer, nullable=False),
        sa.Column("block_end", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Index("completion_route_peer", "peer_id"),
    )
    sa.Table(
        "probes", metadata,
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("worker_id", sa.Text, sa.ForeignKey("workers.worker_id"), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("block", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),  # positions the worker computed: attested work
        sa.Column("error", sa.Double),  # relative L2 error against the reference; NULL: no answer
        sa.Column("tolerance", sa.Double, nullable=False),
        sa.Column("problem", sa.Text),  # NULL: passed
        sa.Index("probes_worker", "worker_id", "seq"),
        sqlite_autoincrement=True,
    )
    sa.Table(  # direct clients' signed receipts: what vouches for direct traffic
        "receipts", metadata,
        sa.Column("id", sa.Text, primary_key=True),
        # a server session is vouched for once, whatever receipts name it
        sa.Column("session_id", sa.Text, nullable=False, unique=True),
        sa.Column("peer_id", sa.Text, nullable=False),  # pays only the worker of this peer id
        sa.Column("block_start", sa.Integer, nullable=False),
        sa.Column("block_end", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("client_key_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("receipt", sa.Text, nullable=False),  # as signed, for audits
        sa.Index("receipts_peer", "peer_id"),
    )
    sa.Table(  # per heartbeat interval since registration: what was observed in it
        "uptime_slots", metadata,
        sa.Column("worker_id", sa.Text, sa.ForeignKey("workers.worker_id"), primary_key=True),
        # services/uptime.interval_slot; slot 0 (the registration's) is never recorded
        sa.Column("slot", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("beat", sa.Integer, nullable=False, server_default="0"),  # 1: a valid, healthy heartbeat in it
        # 1: the coordinator saw the worker's whole span ONLINE in the DHT in it
        sa.Column("online", sa.Integer, nullable=False, server_default="0"),
    )
    sa.Table(
        "quarantine", metadata,
        sa.Column("worker_id", sa.Text, sa.ForeignKey("workers.worker_id"), primary_key=True),
        sa.Column("since", sa.Double, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


# The pre-Alembic workers columns, for the rebuild below (SQLite only): the table as that store last defined it.
_WORKERS_COLUMNS = """
    worker_id TEXT PRIMARY KEY, peer_id TEXT NOT NULL UNIQUE, public_key TEXT NOT NULL,
    wallet_address TEXT NOT NULL, model_name TEXT NOT NULL, block_start INTEGER, block_end INTEGER,
    total_blocks INTEGER, torch_dtype TEXT NOT NULL, quant_type TEXT NOT NULL, location TEXT NOT NULL,
    farworker_version TEXT NOT NULL, announce_maddrs TEXT NOT NULL, hardware TEXT NOT NULL, state TEXT NOT NULL,
    registered_at REAL NOT NULL, last_registered_at REAL NOT NULL, heartbeat_interval REAL NOT NULL,
    heartbeat_count INTEGER NOT NULL DEFAULT 0, counted_beat_at REAL, last_heartbeat_at REAL, last_heartbeat TEXT,
    host_id TEXT, instance INTEGER, reachability TEXT
"""


def _columns(bind) -> dict[str, int]:
    """workers' columns -> their NOT NULL flag (SQLite's table_info)."""
    return {row[1]: row[3] for row in bind.exec_driver_sql("PRAGMA table_info(workers)")}


def _legacy_sqlite(bind) -> None:
    """Bring a pre-Alembic SQLite ledger's workers table to the baseline. Foreign keys are off meanwhile (the store
    turns them on after migrating), so heartbeats and usage keep referring to ``workers`` by name."""
    columns = _columns(bind)
    # Ledgers from before workers registered ahead of loading their blocks: NOT NULL block columns. SQLite cannot
    # drop a constraint, so the table is rebuilt with today's definition and its rows copied (SQLite's documented
    # ALTER TABLE procedure). Missing host and reachability columns come in as NULL.
    for name, kind in (("host_id", "TEXT"), ("instance", "INTEGER"), ("reachability", "TEXT")):
        if name not in columns:
            bind.exec_driver_sql(f"ALTER TABLE workers ADD COLUMN {name} {kind}")
    if columns.get("block_start"):
        names = ", ".join(_columns(bind))
        bind.exec_driver_sql(f"CREATE TABLE workers_unknown_blocks ({_WORKERS_COLUMNS})")
        bind.exec_driver_sql(f"INSERT INTO workers_unknown_blocks ({names}) SELECT {names} FROM workers")
        bind.exec_driver_sql("DROP TABLE workers")
        bind.exec_driver_sql("ALTER TABLE workers_unknown_blocks RENAME TO workers")
        if bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall():
            raise RuntimeError("the rebuilt workers table breaks a foreign key")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and sa.inspect(bind).has_table("workers"):
        _legacy_sqlite(bind)
    metadata = sa.MetaData()
    baseline_tables(metadata)
    # checkfirst: a pre-Alembic ledger has some of these tables (as the old CREATE TABLE IF NOT EXISTS did)
    metadata.create_all(bind, checkfirst=True)
