"""The store on both backends: every Store method on a real SQLite file and on a real Postgres
(tests/postgres_server.py), two stores on one database (two coordinator replicas) racing on the same key, the
migration of ledgers written before the schema was versioned, and `farworker coordinator copy-ledger`. Expected
figures are written out by hand."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from test_ledger_rules import MODEL, PEER, T0, receipt, record, registration

from farworker.coordinator import migrations
from farworker.coordinator import store as store_module
from farworker.coordinator.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_WORKER = "w-75e6fa5aa27a47ee"  # the worker in tests/fixtures/*.sql
LEGACY_PEER = "12D3KooWLegacyPeer1"
HALF = lambda start, end: 0.5  # noqa: E731 (share_of: every span is half the model)


@pytest.fixture
def store(ledger_db):
    s = Store(ledger_db)
    yield s
    s.close()


# --- every method, on both backends ---------------------------------------------------------------------------
def test_workers_beats_and_nonces(store, monkeypatch):
    worker_id = store.register(registration(), T0, 30.0)
    assert store.register({**registration(), "blocks": None, "location": "Elsewhere"}, T0 + 5, 30.0) == worker_id
    row = store.worker_row(worker_id)
    assert (row["block_start"], row["block_end"], row["location"]) == (None, None, "Elsewhere")
    assert (row["registered_at"], row["last_registered_at"], row["state"]) == (T0, T0 + 5, "joining")
    assert store.public_key_of(PEER) == "k" * 64 and store.public_key_of("nobody") is None
    assert store.worker_by_peer(PEER) == worker_id and store.worker_ids() == [worker_id]
    other = store.register(registration(peer_id="12D3KooWOther"), T0 + 1, 30.0)
    assert store.worker_ids() == [worker_id, other]
    rows = store.worker_rows()
    assert [r["worker_id"] for r in rows] == [worker_id, other] and rows[0] == store.worker_row(worker_id)

    monkeypatch.setattr(store_module, "HEARTBEAT_HISTORY", 2)
    # slots of 30 s from T0: beats at +31 (slot 1), +40 (slot 1 again: not counted), +61 (slot 2), +70 unhealthy
    for at, healthy in ((31, True), (40, True), (61, True), (70, False)):
        store.heartbeat(worker_id, {"state": "online", "blocks": [0, 2], "healthy": healthy}, T0 + at)
    row = store.worker_row(worker_id)
    assert (row["heartbeat_count"], row["counted_beat_at"], row["block_end"]) == (2, T0 + 61, 2)
    assert [b["received_at"] for b in store.heartbeats(worker_id)] == [T0 + 61, T0 + 70]  # the newest 2
    store.record_online({worker_id: 2, other: 1})
    assert store.count_slots(worker_id, online=False) == 2 and store.count_slots(worker_id, online=True) == 1
    assert store.count_slots(worker_id, online=False, before=2) == 1
    assert store.count_slots(worker_id, online=False, from_slot=2) == 1
    store.set_state(worker_id, "offline")
    assert store.worker_row(worker_id)["state"] == "offline"

    assert store.consume_nonce(PEER, "n-1", T0, keep_s=60) is True
    assert store.consume_nonce(PEER, "n-1", T0 + 59, keep_s=60) is False  # a replay inside the window
    assert store.consume_nonce("12D3KooWOther", "n-1", T0 + 59, keep_s=60) is True  # nonces are per peer
    assert store.consume_nonce(PEER, "n-1", T0 + 61, keep_s=60) is True  # forgotten after keep_s
    assert store.counts()["workers"] == 2 and store.counts()["heartbeats"] == 2


def test_ledger_probes_receipts_and_completions(store):
    worker_id = store.register(registration(), T0, 30.0)
    other = store.register(registration(peer_id="12D3KooWOther"), T0, 30.0)
    # 100 tokens at half the model, reliability 0.8, 0.001 $FAR a token: 0.04 $FAR; 200 token-blocks (0:2)
    assert store.add_usage(worker_id, [record(100, n=1), record(100, n=1)], T0 + 10, HALF, 0.8, 0.001) == [
        record(100, n=1)["id"]]
    assert store.add_usage(other, [record(7, n=1)], T0 + 11, HALF, 1.0, 0.001) == []  # another worker's id
    assert store.add_usage(worker_id, [record(100, n=1)], T0 + 12, HALF, 1.0, 0.001) == [record(100, n=1)["id"]]
    [stored] = store.usage_records(worker_id)
    assert (stored["tokens"], stored["received_at"], stored["earned_far"]) == (100, T0 + 10, pytest.approx(0.04))
    assert store.usage_records(other) == [] and len(store.usage_records()) == 1

    assert store.record_completion("cmpl-1", T0 + 20, MODEL, 3, 40,
                                   [{"peer_id": PEER, "worker_id": worker_id, "blocks": [0, 2], "tokens": 40}],
                                   key_name="alice") is True
    assert store.record_completion("cmpl-1", T0 + 21, MODEL, 3, 40,
                                   [{"peer_id": PEER, "worker_id": worker_id, "blocks": [0, 2], "tokens": 40}],
                                   key_name="alice") is False  # recorded once
    assert store.completion_routes() == [{"completion_id": "cmpl-1", "peer_id": PEER, "worker_id": worker_id,
                                          "block_start": 0, "block_end": 2, "tokens": 40}]
    assert store.key_usage() == [{"key_name": "alice", "completions": 1, "prompt_tokens": 3, "completion_tokens": 40}]

    assert store.add_receipts([receipt((0, 2), 20, n=1), receipt((0, 2), 20, n=1)], T0 + 30) == (
        [receipt((0, 2), 20, n=1)["id"]], [])
    second_for_session = {**receipt((0, 2), 20, n=2), "session_id": receipt((0, 2), 20, n=1)["session_id"]}
    assert store.add_receipts([second_for_session], T0 + 31) == ([], [second_for_session["id"]])

    store.record_probe(worker_id, T0 + 40, 1, 8, 1e-6, 1e-3, None, quarantine=False)
    store.record_reachability(worker_id, '{"at": 1, "tried": {}}')
    assert store.worker_row(worker_id)["reachability"] == '{"at": 1, "tried": {}}'
    totals = store.ledger_totals(worker_id, since=T0 + 10, paid_until=T0 + 100, settled_until=T0 + 5)
    assert totals == {
        "claimed_tokens": 100, "claimed_token_blocks": 200, "claimed_far": pytest.approx(0.04),
        "payable_far": pytest.approx(0.04), "payable_far_recent": pytest.approx(0.04),
        "routed_tokens": 40, "routed_token_blocks": 80, "probed_tokens": 8,
        "payable_by_price": [(200, pytest.approx(0.04), 0.0)],  # received at +10: not settled by +5
        "vouched_tokens": 20, "vouched_token_blocks": 40,
    }
    assert store.ledger_totals(worker_id, since=T0, paid_until=T0 + 10)["payable_far"] == 0.0  # received at +10

    assert store.probe_summary(worker_id) == {"probes": 1, "probes_passed": 1, "last_probe_at": T0 + 40,
                                              "last_probe_problem": None}
    store.record_probe(worker_id, T0 + 50, 0, 8, 0.5, 1e-3, "block 0 differs", quarantine=True)
    store.record_probe(worker_id, T0 + 60, 0, 8, 0.5, 1e-3, "again", quarantine=True)  # the first one stands
    assert store.quarantine_of(worker_id) == {"since": T0 + 50, "reason": "block 0 differs"}
    assert store.quarantine_of(other) is None and store.quarantined_peers() == {PEER}
    assert store.probe_summary(worker_id)["probes_passed"] == 1 and store.probe_summary(worker_id)["probes"] == 3
    assert store.counts() == {"workers": 2, "heartbeats": 0, "usage": 1, "completions": 1, "completion_keys": 1,
                              "completion_route": 1, "probes": 3, "quarantine": 1, "receipts": 1, "uptime_slots": 0}


def test_pages_proofs_probe_runs_slots_routes_and_leases(store):
    """The queries of the pages (GET /v1/workers, /v1/hosts), the flood rules (proven workers, unanswered probes),
    observed uptime's first slot, the mesh page's reads and the replicas' lease: the same answers on both backends."""
    a = store.register({**registration("12D3KooWA"), "host_id": "h-2"}, T0 + 2, 30.0)
    b = store.register({**registration("12D3KooWB"), "host_id": "h-1"}, T0 + 1, 30.0)
    c = store.register(registration("12D3KooWC"), T0 + 1, 30.0)  # no host id; same time as b: worker id decides
    first_two = store.worker_rows_page(None, 2)
    assert [r["worker_id"] for r in first_two] == sorted([b, c])
    rest = store.worker_rows_page((first_two[-1]["registered_at"], first_two[-1]["worker_id"]), 2)
    assert [r["worker_id"] for r in rest] == [a]
    assert store.host_keys_page(None, 10) == [(0, "h-1"), (0, "h-2"), (1, "")]
    assert store.host_keys_page((0, "h-1"), 10) == [(0, "h-2"), (1, "")]
    assert [r["worker_id"] for r in store.worker_rows_of_hosts(["h-2"], no_host=True)] == [c, a]
    assert store.worker_rows_of_hosts([], no_host=False) == []

    # proof: a passed probe proves a; b has only unanswered probes; c nothing
    assert store.proven_worker_ids() == set() and store.unproven_workers(T0) == (3, T0 + 1)
    store.record_probe(a, T0 + 10, 0, 8, 1e-6, 1e-3, None, quarantine=False)
    for at in (11, 12, 13):  # no answer at all: error none, tokens 0, a problem
        store.record_probe(b, T0 + at, 0, 0, None, 1e-3, "no answer", quarantine=False)
    assert store.proven_worker_ids() == {a}
    assert store.unproven_workers(T0) == (2, T0 + 1) and store.unproven_workers(T0 + 2) == (0, None)
    assert store.probe_stats() == {a: {"last_at": T0 + 10, "unanswered": 0}, b: {"last_at": T0 + 13, "unanswered": 3}}
    assert store.probe_stats(b) == {b: {"last_at": T0 + 13, "unanswered": 3}}
    store.record_probe(b, T0 + 14, 0, 8, 0.5, 1e-3, "differs", quarantine=False)  # a wrong answer is an answer
    assert store.probe_stats(b)[b]["unanswered"] == 0
    assert [p["at"] for p in store.probes(b, 2)] == [T0 + 14, T0 + 13]

    # the first slot with a beat (and seen online)
    assert store.first_slot(a, online=False) is None
    for at in (31, 61, 91):
        store.heartbeat(a, {"state": "online", "blocks": [0, 2], "healthy": True}, T0 + at)
    store.record_online({a: 2})
    assert store.first_slot(a, online=False) == 1 and store.first_slot(a, online=True) == 2
    assert store.first_slot(a, online=True, before=2) is None
    assert store.worker_row(a)["announced_throughput"] is None  # not seen in the DHT yet
    store.record_throughput({a: 12.5})
    assert store.worker_row(a)["announced_throughput"] == 12.5 and store.worker_row(b)["announced_throughput"] is None

    # the latest completions, newest first, each with its route
    for n, at in ((1, 20), (2, 30)):
        store.record_completion(f"cmpl-{n}", T0 + at, MODEL, 3, 4,
                                [{"peer_id": "12D3KooWA", "worker_id": a, "blocks": [0, 2], "tokens": 4}])
    latest = store.latest_completions(1)
    assert [(x["id"], [r["worker_id"] for r in x["route"]]) for x in latest] == [("cmpl-2", [a])]

    # the lease: free, then held until it expires; the other replica takes it only after
    assert store.lease("loops") is None
    assert store.take_lease("loops", "r1", T0, T0 + 30) is True
    assert store.take_lease("loops", "r2", T0 + 29, T0 + 59) is False
    assert store.take_lease("loops", "r1", T0 + 29, T0 + 59) is True  # renewed
    assert store.take_lease("loops", "r2", T0 + 60, T0 + 90) is True  # expired at +59
    store.release_lease("loops", "r1")  # not its own any more: nothing changes
    assert store.lease("loops") == {"holder": "r2", "expires_at": T0 + 90}
    store.release_lease("loops", "r2")
    assert store.take_lease("loops", "r1", T0 + 61, T0 + 91) is True


def test_a_store_refuses_a_url_it_cannot_serve():
    with pytest.raises(ValueError, match="accepts a SQLite file path or a postgresql:// URL, got a mysql:// URL"):
        Store("mysql://user@127.0.0.1/ledger")


# --- two replicas, one key, at once -----------------------------------------------------------------------------
def _lock_waiters(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock'").fetchone()[0]


def race(db, call, blocker_sql: str = "", params: dict | None = None) -> list:
    """``call(store)`` from two stores on one database (two coordinators) at once. On Postgres a third transaction
    first holds the same key (``blocker_sql``, uncommitted) and both calls are let go only once both wait on it:
    each has passed any check it makes before either writes, the interleaving a check-then-insert loses. On
    SQLite the third holds the write lock instead (BEGIN IMMEDIATE): SQLite's single writer serialises them."""
    stores = [Store(db), Store(db)]
    try:
        if isinstance(db, str):
            blocker = psycopg.connect(db)
            blocker.execute(blocker_sql, params or {})
        else:
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(2) as pool:
            started = threading.Barrier(3)

            def run(s):
                started.wait(timeout=30)
                return call(s)

            futures = [pool.submit(run, s) for s in stores]
            started.wait(timeout=30)
            if isinstance(db, str):
                deadline = time.monotonic() + 30
                while _lock_waiters(db) < 2:
                    assert time.monotonic() < deadline, "the two calls never waited on the key the blocker holds"
                    time.sleep(0.02)
            else:
                time.sleep(0.2)  # both into SQLite's busy wait (no way to see it; the test holds either way)
            blocker.rollback()
            blocker.close()
            return [f.result(timeout=60) for f in futures]
    finally:
        for s in stores:
            s.close()


def test_a_nonce_racing_on_two_replicas_is_taken_once(ledger_db):
    results = race(ledger_db, lambda s: s.consume_nonce(PEER, "same", T0, 60),
                   "INSERT INTO nonces (peer_id, nonce, seen_at) VALUES (%(peer)s, 'same', 0)", {"peer": PEER})
    assert sorted(results) == [False, True]


def registered(db) -> str:
    """The worker under test, registered at T0 (30 s slots); its id."""
    s = Store(db)
    try:
        return s.register(registration(), T0, 30.0)
    finally:
        s.close()


def test_a_usage_record_racing_on_two_replicas_is_counted_once(ledger_db):
    worker_id = registered(ledger_db)
    results = race(ledger_db, lambda s: s.add_usage(worker_id, [record(100, n=9)], T0 + 10, HALF, 1.0, 0.001),
                   "INSERT INTO usage VALUES (%(id)s, %(w)s, 's', 0, 2, 1, 1, 0, 0, 0, 1, 1, 1)",
                   {"id": record(100, n=9)["id"], "w": worker_id})
    assert results == [[record(100, n=9)["id"]]] * 2  # both acknowledged: the worker's outbox lets it go
    check = Store(ledger_db)
    assert [r["tokens"] for r in check.usage_records()] == [100]
    assert check.ledger_totals(worker_id, T0, T0 + 100)["claimed_far"] == pytest.approx(0.05)  # 100 x 0.5 x 0.001
    check.close()


def test_a_receipt_racing_on_two_replicas_is_counted_once(ledger_db):
    worker_id = registered(ledger_db)
    r = receipt((0, 2), 20, n=5)
    results = race(ledger_db, lambda s: s.add_receipts([r], T0 + 10),
                   "INSERT INTO receipts VALUES (%(id)s, %(session)s, 'p', 0, 1, 1, 'm', 'k', 0, 0, '{}')",
                   {"id": r["id"], "session": r["session_id"]})
    assert results == [([r["id"]], [])] * 2
    check = Store(ledger_db)
    assert check.ledger_totals(worker_id, T0, T0 + 100)["vouched_tokens"] == 20 and check.counts()["receipts"] == 1
    check.close()


def test_a_completion_racing_on_two_replicas_attests_its_route_once(ledger_db):
    worker_id = registered(ledger_db)
    route = [{"peer_id": PEER, "worker_id": worker_id, "blocks": [0, 2], "tokens": 40}]
    results = race(ledger_db, lambda s: s.record_completion("cmpl-race", T0 + 10, MODEL, 3, 40, route, "alice"),
                   "INSERT INTO completions VALUES ('cmpl-race', 0, 'm', 1, 1)")
    assert sorted(results) == [False, True]
    check = Store(ledger_db)
    assert check.ledger_totals(worker_id, T0, T0 + 100)["routed_tokens"] == 40
    assert check.key_usage() == [{"key_name": "alice", "completions": 1, "prompt_tokens": 3, "completion_tokens": 40}]
    check.close()


def test_a_registration_racing_on_two_replicas_gives_one_worker(ledger_db):
    results = race(ledger_db, lambda s: s.register(registration(), T0, 30.0),
                   "INSERT INTO workers (worker_id, peer_id, public_key, wallet_address, model_name, torch_dtype,"
                   " quant_type, location, farworker_version, announce_maddrs, hardware, state, registered_at,"
                   " last_registered_at, heartbeat_interval) VALUES"
                   " ('w-blocker', %(peer)s, 'k', 'w', 'm', 'd', 'q', 'l', 'v', '[]', '{}', 's', 0, 0, 1)",
                   {"peer": PEER})
    assert results[0] == results[1] and results[0] != "w-blocker"
    check = Store(ledger_db)
    assert check.worker_ids() == [results[0]]
    check.close()


def test_two_beats_racing_on_two_replicas_count_one_slot(ledger_db):
    worker_id = registered(ledger_db)
    results = race(ledger_db, lambda s: s.heartbeat(worker_id, {"state": "online", "healthy": True}, T0 + 31),
                   "SELECT 1 FROM workers WHERE worker_id = %(w)s FOR UPDATE", {"w": worker_id})
    assert results == [None, None]
    check = Store(ledger_db)
    assert check.worker_row(worker_id)["heartbeat_count"] == 1 and len(check.heartbeats(worker_id)) == 2
    assert check.count_slots(worker_id, online=False) == 1
    check.close()


# --- ledgers from before the schema was versioned -------------------------------------------------------------
def legacy_ledger(tmp_path, fixture: str) -> Path:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / fixture).read_text())
    conn.close()
    return path


@pytest.mark.parametrize("fixture", ["ledger_main_8785fc5.sql", "ledger_before_host_columns.sql"])
def test_a_sqlite_ledger_from_before_versioning_migrates_in_place(tmp_path, fixture):
    path = legacy_ledger(tmp_path, fixture)
    newest = fixture == "ledger_main_8785fc5.sql"  # the older one has no host columns, receipts or API keys yet
    for _start in range(2):  # the second start finds the ledger at head and changes nothing
        store = Store(path)
        assert store.schema_revision() == migrations.head_revision()
        row = store.worker_row(LEGACY_WORKER)
        assert (row["peer_id"], row["heartbeat_count"], row["block_start"], row["block_end"]) == (LEGACY_PEER, 1, 0, 2)
        assert (row["host_id"], row["instance"]) == (("host-a", 0) if newest else (None, None))
        assert [(r["id"], r["tokens"], r["earned_far"]) for r in store.usage_records()] == [
            ("00000000-0000-4000-8000-000000000001", 100, 0.05)]
        totals = store.ledger_totals(LEGACY_WORKER, since=0, paid_until=T0 + 100)
        assert (totals["claimed_tokens"], totals["routed_tokens"], totals["probed_tokens"]) == (100, 40, 8)
        assert totals["vouched_tokens"] == (20 if newest else 0)
        assert store.key_usage() == ([{"key_name": "alice", "completions": 1, "prompt_tokens": 3,
                                       "completion_tokens": 40}] if newest else [])
        assert store.count_slots(LEGACY_WORKER, online=True) == (1 if newest else 0)
        assert store.consume_nonce(LEGACY_PEER, "nonce-1", T0 + 40, 120) is False  # still refused as a replay
        store.close()
    # today's schema: a worker may register before it knows its blocks (the old NOT NULL is gone), new ids continue
    store = Store(path)
    new = store.register({**registration(peer_id="12D3KooWNew"), "blocks": None}, T0 + 50, 30.0)
    assert store.worker_row(new)["block_start"] is None
    store.record_probe(LEGACY_WORKER, T0 + 60, 0, 4, 1e-6, 1e-3, None, quarantine=False)
    assert store.probe_summary(LEGACY_WORKER)["probes"] == 2
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


# --- copy-ledger ------------------------------------------------------------------------------------------------
def copy_ledger(*args: str):
    from click.testing import CliRunner

    from farworker.coordinator.command import coordinator_command

    return CliRunner().invoke(coordinator_command, ["copy-ledger", *args])


def test_copy_ledger_moves_a_sqlite_ledger_into_postgres_and_checks_the_totals(tmp_path, postgres_server):
    source = legacy_ledger(tmp_path, "ledger_main_8785fc5.sql")  # a ledger as main's store wrote it
    s = Store(source)
    s.add_usage(LEGACY_WORKER, [record(30, n=2)], T0 + 40, HALF, 1.0, 0.001)  # 30 x 0.5 x 0.001 = 0.015 $FAR
    s.close()
    url = postgres_server.new_database()
    result = copy_ledger("--from", str(source), "--to", url)
    assert result.exit_code == 0, result.output
    for line in ("ok       usage rows: 2 -> 2", "ok       usage tokens: 130 -> 130", "ok       heartbeats rows: 1 -> 1",
                 "ok       receipts tokens: 20 -> 20", f"ok       {LEGACY_WORKER} routed_tokens: 40 -> 40"):
        assert line in result.output.splitlines()
    assert result.output.splitlines()[-1] == "totals match"

    copy = Store(url)  # a working ledger: the same figures, the replay window, sequences that continue
    totals = copy.ledger_totals(LEGACY_WORKER, since=0, paid_until=T0 + 100)
    assert (totals["claimed_tokens"], totals["claimed_far"]) == (130, pytest.approx(0.065))
    assert copy.consume_nonce(LEGACY_PEER, "nonce-1", T0 + 40, 120) is False
    copy.heartbeat(LEGACY_WORKER, {"state": "online", "healthy": True}, T0 + 95)
    copy.record_probe(LEGACY_WORKER, T0 + 96, 0, 4, 1e-6, 1e-3, None, quarantine=False)
    assert copy.counts()["heartbeats"] == 2 and copy.probe_summary(LEGACY_WORKER)["probes"] == 2
    copy.close()

    again = copy_ledger("--from", str(source), "--to", url)
    assert again.exit_code == 78 and "already holds a ledger; copy into an empty database" in again.output
    with psycopg.connect(url, autocommit=True) as conn:  # a row changed behind the tool's back
        conn.execute("UPDATE usage SET tokens = tokens - 1 WHERE id = %s", (record(30, n=2)["id"],))
    checked = copy_ledger("--from", str(source), "--to", url, "--verify-only")
    assert checked.exit_code == 1
    assert "MISMATCH usage tokens: 130 -> 129" in checked.output.splitlines()
    assert checked.output.splitlines()[-1] == "totals DIFFER: the copy is not the ledger"
    wrong = copy_ledger("--from", str(source), "--to", str(tmp_path / "other.sqlite"))
    assert wrong.exit_code == 78 and "--to must be a postgresql:// URL" in wrong.output


def test_the_coordinator_names_a_database_it_cannot_use_in_one_line(tmp_path):
    import subprocess
    import sys

    from farworker.local_mesh import base_env

    def coordinator(db: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "farworker", "coordinator", "--db", db, "--port", "9"],
                              env=base_env(), capture_output=True, text=True, timeout=120, check=False)

    wrong = coordinator("mysql://user@127.0.0.1/ledger")
    assert wrong.returncode == 78  # configuration: systemd does not retry it
    assert wrong.stderr.strip().splitlines() == [
        "--db accepts a SQLite file path or a postgresql:// URL, got a mysql:// URL"]
    down = coordinator("postgresql://farworker:secret@127.0.0.1:9/ledger")  # nothing listens on the discard port
    assert down.returncode == 75  # temporary: Restart=on-failure tries again
    [line] = down.stderr.strip().splitlines()
    assert line.startswith("cannot open the ledger postgresql://farworker:***@127.0.0.1:9/ledger: ")
    assert "secret" not in line
