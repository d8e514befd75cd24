"""The coordinator's disk fills up: writes to its ledger database are refused (SQLite: "database or disk is full").

Writes are answered 503 with a one-line reason and Retry-After, nothing refused is acknowledged (so the worker's
outbox keeps it and sends it again), reads go on, /metrics says the store refuses writes, and writes resume by
themselves once there is space: at the end the ledger holds exactly what the worker's outbox held, once.

The database lives on a real 8 MiB tmpfs the test mounts (root only, tests/small_fs.py) and fills with a file.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
import uuid

import pytest
import requests
from coordinator_fixtures import heartbeat, registration, signed_post
from polling import wait_for
from small_fs import fill, small_dir_fixture  # noqa: F401 (the small_dir fixture)

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import load_or_create
from farworker.local_mesh import start_bootstrap_peer, start_worker, stop_all
from farworker.outbox import Outbox, make_record
from farworker.reporting import Reporter
from farworker.threading_policy import apply_thread_policy
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint

wait_for_fast = functools.partial(wait_for, step=0.05)


def record(tokens: int) -> dict:
    return make_record(f"sess-{uuid.uuid4().hex[:8]}", (0, 2), tokens=tokens, steps=1, started_at=time.time() - 0.1)


def ledger_rows(db) -> dict[str, int]:
    """The usage ledger as it is on disk (read beside the coordinator, not through it): id -> tokens."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return dict(conn.execute("SELECT id, tokens FROM usage").fetchall())


def refusing_writes(url: str) -> str | None:
    lines = requests.get(f"{url}/metrics", timeout=10).text.splitlines()
    return next((line.split()[-1] for line in lines if line.startswith("farworker_coordinator_store_refusing_writes ")),
                None)


def test_a_full_disk_refuses_writes_with_503_keeps_reads_and_loses_nothing(tmp_path, small_dir):
    db = small_dir / "coordinator.sqlite3"
    coordinator = RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=0.5)).start()
    identity = load_or_create(tmp_path / "identity.key")
    outbox = Outbox(tmp_path / "outbox.sqlite3")  # the worker's state dir has room: only the coordinator's is full
    reporter = Reporter(CoordinatorClient(coordinator.url, identity, timeout=5.0), outbox,
                        lambda: registration(identity), lambda: heartbeat(tokens=3), interval=0.5, batch_size=25,
                        backoff_initial_s=0.05, backoff_max_s=0.5, flush_delay_s=0.02).start()
    sent: dict[str, int] = {}  # every record the worker made: id -> tokens
    try:
        wait_for_fast(lambda: reporter.worker_id, 30, "registered")
        worker_id = reporter.worker_id
        for i in range(20):
            made = record(10 + i)
            outbox.add(made)
            sent[made["id"]] = made["tokens"]
        wait_for_fast(lambda: outbox.depth() == 0, 30, "the first records sent")

        filler = fill(small_dir)
        # The WAL may still take a few writes in pages it already has: refusals start once it must grow.
        for i in range(200):
            made = record(100 + i)
            outbox.add(made)
            sent[made["id"]] = made["tokens"]
            if coordinator.app.state.store.write_refusals.refusing and i >= 30:
                break
        wait_for_fast(lambda: reporter.stats["flush_failures"] > 0, 30, "a usage flush refused")

        # a write now: 503, one line naming the cause, Retry-After; nothing stored
        probe = record(7)
        answer = signed_post(coordinator.url, identity, f"/v1/workers/{worker_id}/usage", {"records": [probe]})
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["code"] == "store_full" and "disk is full" in body["error"] and "\n" not in body["error"]
        assert int(answer.headers["Retry-After"]) > 0
        assert "503" in (reporter.last_error or ""), reporter.last_error  # the worker took it as retry-later
        assert outbox.depth() > 0  # ... and kept the records

        # reads go on
        listed = requests.get(f"{coordinator.url}/v1/workers", timeout=10)
        assert listed.status_code == 200 and any(w["worker_id"] == worker_id for w in listed.json()["workers"])
        assert requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=10).status_code == 200
        assert requests.get(f"{coordinator.url}/v1/hosts", timeout=10).status_code == 200
        assert refusing_writes(coordinator.url) == "1.0"

        on_ledger = ledger_rows(db)
        assert probe["id"] not in on_ledger
        held = {r["id"] for r in outbox.pending(limit=100_000)}
        assert not held & set(on_ledger)  # what the outbox still holds was never acknowledged... nor stored

        filler.unlink()  # space again: no restart, the outbox drains
        wait_for_fast(lambda: outbox.depth() == 0, 60, "the outbox drained once there is space")
        # the spell ends once writes (the heartbeats) went through for write_refusals.SETTLE_S
        wait_for(lambda: refusing_writes(coordinator.url) == "0.0", 60, "/metrics: writes accepted again")
        again = signed_post(coordinator.url, identity, f"/v1/workers/{worker_id}/usage", {"records": [probe]})
        assert again.status_code == 200 and again.json()["accepted"] == [probe["id"]], again.text
        sent[probe["id"]] = probe["tokens"]

        assert ledger_rows(db) == sent  # nothing lost, nothing doubled, nothing else
        view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=10).json()
        assert view["tokens_served"] == sum(sent.values())
    finally:
        reporter.stop()
        outbox.close()
        coordinator.stop()


def test_a_write_answered_2xx_on_a_full_disk_is_on_the_ledger(tmp_path, small_dir, caplog):
    """The adversary is the disk: while it is full, every usage report answered 2xx must have every accepted id on
    the ledger, and every other answer must be the 503 refusal. A store that acknowledged a write its database
    refused (a swallowed COMMIT error) would answer 200 here with the record dropped."""
    caplog.set_level(logging.INFO, logger="farworker.coordinator")
    db = small_dir / "coordinator.sqlite3"
    coordinator = RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=5.0)).start()
    identity = load_or_create(tmp_path / "identity.key")
    try:
        registered = signed_post(coordinator.url, identity, "/v1/workers/register", registration(identity))
        worker_id = registered.json()["worker_id"]
        path = f"/v1/workers/{worker_id}/usage"
        filler = fill(small_dir)
        acknowledged: set[str] = set()
        refused = 0
        for i in range(300):  # a big batch each: the WAL must grow, so some commits hit the full disk
            batch = [record(1 + i) for _ in range(40)]
            answer = signed_post(coordinator.url, identity, path, {"records": batch})
            if answer.ok:
                acknowledged.update(answer.json()["accepted"])
            else:
                assert answer.status_code == 503 and answer.json()["code"] == "store_full", answer.text
                refused += 1
            if refused >= 20:
                break
        filler.unlink()
        lost = acknowledged - set(ledger_rows(db))
        assert not lost, f"{len(lost)} of {len(acknowledged)} records answered 2xx are missing from the ledger"
        assert refused > 0, "the full disk never refused a write: the test proves nothing"
        # and writes resume by themselves
        last = [record(5)]
        answer = signed_post(coordinator.url, identity, path, {"records": last})
        assert answer.status_code == 200, answer.text
        assert last[0]["id"] in ledger_rows(db)

        def settled() -> bool:  # writes go through for write_refusals.SETTLE_S: the spell is over
            beat = signed_post(coordinator.url, identity, f"/v1/workers/{worker_id}/heartbeat", heartbeat())
            assert beat.status_code == 200, beat.text
            return not coordinator.store.write_refusals.refusing

        wait_for(settled, 60, "writes accepted again", step=1.0)
        said = [r.getMessage() for r in caplog.records if r.name == "farworker.coordinator"]
        # the operator is told once per spell, not once per refused write
        assert sum("refuses writes" in m for m in said) == 1, said
        assert sum("accepts writes again" in m for m in said) == 1, said
    finally:
        coordinator.stop()


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_background_loops_carry_on_through_a_full_disk(tmp_path, small_dir, caplog):
    """The probe loop, the routed checks and the DHT watch write to the ledger; on a full disk they skip their
    writes without dying or logging each round (the store says it once), and record again once there is space.
    A completion while full is refused with 503 (its route could not be attested), in OpenAI's error shape."""
    caplog.set_level(logging.INFO, logger="farworker.coordinator")
    apply_thread_policy("passive")
    model = ensure_tiny_checkpoint()
    bootstrap, peers = start_bootstrap_peer(tmp_path)
    coordinator = RunningCoordinator(Settings(
        db_path=small_dir / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=model,
        model_name=TINY_MODEL_NAME, initial_peers=tuple(peers), probe_period_s=1.0)).start()
    runtime, store = coordinator.app.state.runtime, coordinator.store
    worker = start_worker(tmp_path, "w", coordinator.url, peers, "0:4")
    try:
        worker.wait_online(timeout=180)
        worker_id = wait_for(lambda: store.worker_by_peer(worker.status()["peer_id"]), 30, "registered")
        wait_for(lambda: store.probe_summary(worker_id)["probes"] > 0, 60, "a first probe recorded")
        wait_for(lambda: store.count_slots(worker_id, online=True) > 0, 60, "a first online slot recorded")

        filler = fill(small_dir)
        answer = requests.post(f"{coordinator.url}/v1/completions", json={"prompt": [1, 37, 101], "max_tokens": 4},
                               timeout=120)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "store_full" and int(answer.headers["Retry-After"]) > 0
        refused = store.write_refusals.refused_total
        time.sleep(6.0)  # several probe periods and DHT-watch intervals on the full disk (a wait, not a check)
        assert store.write_refusals.refused_total > refused

        probes_before = store.probe_summary(worker_id)["probes"]
        filler.unlink()
        wait_for(lambda: store.probe_summary(worker_id)["probes"] > probes_before, 60, "probes recorded again")
        slots = store.count_slots(worker_id, online=True)
        wait_for(lambda: store.count_slots(worker_id, online=True) > slots, 60, "online slots recorded again")
        wait_for(lambda: not store.write_refusals.refusing, 60, "writes accepted again (the worker's heartbeats)")
        for part in (runtime.spot_checks, runtime.dht_watch):
            assert part._thread.is_alive(), part
        said = [r.getMessage() + (r.exc_text or "") for r in caplog.records if r.name == "farworker.coordinator"]
        assert sum("refuses writes" in m for m in said) == 1, said
        assert not [m for m in said if "round failed" in m or "could not read the DHT" in m or "StoreFull" in m]
        wait_for(lambda: worker.status()["outbox_depth"] == 0, 60, "the worker's outbox sent once there is space")
    finally:
        stop_all([worker.proc], timeout=30)
        coordinator.stop()
        bootstrap.stop()
