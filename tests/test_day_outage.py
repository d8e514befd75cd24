"""The coordinator is unreachable for a day: the worker's outbox holds the day's usage records (on disk, about
0.75 KiB each) and, once the coordinator is back, drains them in the order they were made, each once.

Time is injected: the records carry the timestamps of a day's serving (one record per 10 s, as a session's meter
cuts them), made while the coordinator is down; the reporter's retries are capped (Backoff), so a day of failures
ends in the same state as a few: what this checks is that nothing in the outbox or the ledger bounds or reorders a
day's backlog, and that the coordinator takes day-old records.
"""

from __future__ import annotations

import functools
import sqlite3
import time

from coordinator_fixtures import heartbeat, registration
from polling import wait_for

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import load_or_create
from farworker.outbox import Outbox, make_record
from farworker.reporting import Reporter

wait_for_fast = functools.partial(wait_for, step=0.05)

DAY_S = 86_400
SEGMENT_S = 10  # a record per 10 s of serving
MAX_OUTBOX_BYTES_PER_RECORD = 2048  # the outbox on disk stays small per record (measured: ~760 B)


def test_a_day_without_the_coordinator_is_held_and_drained_in_order(tmp_path):
    db = tmp_path / "coordinator.sqlite3"
    coordinator = RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=0.5)).start()
    port = coordinator.port
    identity = load_or_create(tmp_path / "identity.key")
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
    reporter = Reporter(CoordinatorClient(coordinator.url, identity, timeout=5.0), outbox,
                        lambda: registration(identity), lambda: heartbeat(tokens=3), interval=0.5,
                        backoff_initial_s=0.05, backoff_max_s=0.5, flush_delay_s=0.02).start()
    made: list[dict] = []
    try:
        wait_for_fast(lambda: reporter.worker_id, 30, "registered")
        coordinator.stop()  # unreachable from here on

        day_began = time.time() - DAY_S
        for i in range(DAY_S // SEGMENT_S):
            start = day_began + i * SEGMENT_S
            record = make_record("day-session", (0, 2), tokens=1 + i % 13, steps=1 + i % 13, started_at=start,
                                 ended_at=start + SEGMENT_S)
            outbox.add(record)
            made.append(record)
        wait_for_fast(lambda: reporter.stats["flush_failures"] >= 3, 30, "flushes failing while it is down")

        assert outbox.depth() == len(made) == 8640  # all of the day held, none acknowledged
        held = outbox.pending(limit=len(made) + 1)
        assert [r["id"] for r in held] == [r["id"] for r in made]  # oldest first
        on_disk = sum(f.stat().st_size for f in outbox.path.parent.iterdir())
        assert on_disk < MAX_OUTBOX_BYTES_PER_RECORD * len(made), on_disk

        coordinator = RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=0.5), port=port).start()
        wait_for_fast(lambda: outbox.depth() == 0, 120, "the day's backlog drained")
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            ledger = conn.execute("SELECT id, tokens, started_at FROM usage ORDER BY rowid").fetchall()
        assert [row[0] for row in ledger] == [r["id"] for r in made]  # each once, in the order made
        assert [(row[1], row[2]) for row in ledger] == [(r["tokens"], r["started_at"]) for r in made]
        assert reporter.stats["records_sent"] == len(made)
    finally:
        reporter.stop()
        outbox.close()
        coordinator.stop()
