"""The reporter against a real coordinator on loopback: backoff, outages, SIGKILL, draining."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from coordinator_fixtures import heartbeat, registration
from polling import wait_for

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import load_or_create
from farworker.outbox import Outbox, make_record
from farworker.reporting import Backoff, Reporter, heartbeat_line

wait_for_fast = functools.partial(wait_for, step=0.02)  # the reporter runs at sub-second intervals here

INTERVAL = 0.3




def settings(tmp_path: Path, db="coordinator.sqlite") -> Settings:
    return Settings(db_path=tmp_path / db, heartbeat_interval_s=INTERVAL)


def record(tokens: int) -> dict:
    return make_record("sess", (0, 2), tokens=tokens, steps=1, started_at=time.time() - 0.1)


@pytest.fixture
def identity(tmp_path):
    return load_or_create(tmp_path / "identity.key")


def make_reporter(url, identity, outbox, heartbeat_payload=lambda: heartbeat(tokens=12), **kwargs) -> Reporter:
    options = dict(interval=5.0, batch_size=25, backoff_initial_s=0.05, backoff_max_s=0.4, flush_delay_s=0.02)
    options.update(kwargs)
    return Reporter(
        CoordinatorClient(url, identity, timeout=2.0),
        outbox,
        lambda: registration(identity),
        heartbeat_payload,
        **options,
    )


def test_backoff_is_capped_exponential_with_jitter():
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert [low.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [high.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    high.reset()
    assert high.next_delay() == 1.0


def test_heartbeat_line():
    line = heartbeat_line(heartbeat(tokens=12), {"earn_rate_far_per_hour": 0.4213, "reliability": 1.0})
    assert line.startswith("heartbeat ok: online, blocks 0:2, 12 tokens, earn rate 0.42 $FAR/h")


def test_registers_after_the_coordinator_comes_up(tmp_path, identity, caplog):
    caplog.set_level(logging.INFO, logger="farworker.reporting")
    coordinator = RunningCoordinator(settings(tmp_path))  # port bound, not listening yet: refused
    outbox = Outbox(tmp_path / "outbox.sqlite")
    made_at = []  # when the reporter made each heartbeat: its own schedule, not the coordinator's latency

    def timed_heartbeat() -> dict:
        made_at.append(time.time())
        return heartbeat(tokens=12)

    reporter = make_reporter(coordinator.url, identity, outbox, heartbeat_payload=timed_heartbeat).start()
    try:
        time.sleep(1.2)
        attempts = reporter.stats["register_attempts"]
        # 0.05 s doubling to a 0.4 s cap (jittered to 0.2-0.4 s): a handful of tries, not a tight loop
        assert 2 <= attempts <= 12, attempts
        assert reporter.worker_id is None and reporter.state == "unregistered"
        outbox.add(record(5))  # usage made while unregistered waits in the outbox
        coordinator.start()
        wait_for_fast(
            lambda: reporter.last_heartbeat is not None and outbox.depth() == 0, 15, "registration + flush"
        )
        assert reporter.interval_s == INTERVAL  # the coordinator's interval wins over the local 5 s
        wait_for_fast(lambda: reporter.stats["heartbeats"] >= 7, 15, "heartbeats at the coordinator's interval")
        beats = coordinator.store.heartbeats(reporter.worker_id)
        steady = made_at[1:]  # the first goes out when the registration answers, off the grid
        gaps = [b - a for a, b in zip(steady, steady[1:], strict=False)]
        # Never faster than the interval: beats are on a grid (reporting.next_beat_time), so one made late is
        # followed by the next sooner than an interval after it, and the count tells, not each gap (at half the
        # interval, 5 gaps would span 1.5 intervals). Late only as far as a loaded 2-core CI machine makes it.
        assert len(gaps) >= 5 and len(gaps) <= (steady[-1] - steady[0]) / INTERVAL + 1, gaps
        assert sorted(gaps)[len(gaps) // 2] <= INTERVAL * 2, gaps
        assert beats[-1]["counters"]["tokens_processed"] == 12 and beats[-1]["gpus"] == []
        assert any(
            "heartbeat ok: online, blocks 0:2, 12 tokens, earn rate" in r.message for r in caplog.records
        )
        assert any("registration failed" in r.message and "cannot reach" in r.message for r in caplog.records)
    finally:
        reporter.stop()
        coordinator.stop()


def test_outage_with_records_arriving_each_arrives_once(tmp_path, identity):
    coordinator = RunningCoordinator(settings(tmp_path)).start()
    port = coordinator.port
    outbox = Outbox(tmp_path / "outbox.sqlite")
    reporter = make_reporter(coordinator.url, identity, outbox).start()
    added: list[dict] = []
    stop = threading.Event()

    def produce():  # a client generating through the mesh: a usage record every 20 ms
        i = 0
        while not stop.is_set() and i < 400:
            r = record(i % 7 + 1)
            outbox.add(r)
            added.append(r)
            i += 1
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    try:
        wait_for_fast(lambda: reporter.last_heartbeat is not None, 15, "registration")
        producer.start()
        time.sleep(0.4)
        coordinator.stop()  # down for several heartbeat intervals
        time.sleep(INTERVAL * 5)
        assert outbox.depth() > 0
        failures = reporter.stats["heartbeat_failures"] + reporter.stats["flush_failures"]
        assert failures >= 2
        coordinator = RunningCoordinator(settings(tmp_path), port=port).start()
        time.sleep(0.5)
        stop.set()
        producer.join(10)
        wait_for_fast(lambda: outbox.depth() == 0, 30, "outbox drained after the outage")
        on_ledger = coordinator.store.usage_records()
        assert sorted(r["id"] for r in on_ledger) == sorted(r["id"] for r in added)
        assert sum(r["tokens"] for r in on_ledger) == sum(r["tokens"] for r in added)
        # heartbeats resumed with the same worker id
        wait_for_fast(
            lambda: len(coordinator.store.heartbeats(reporter.worker_id)) >= 1, 15, "heartbeats after outage"
        )
    finally:
        stop.set()
        reporter.stop()
        coordinator.stop()


def test_registers_again_when_the_coordinator_forgets(tmp_path, identity):
    coordinator = RunningCoordinator(settings(tmp_path)).start()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    reporter = make_reporter(coordinator.url, identity, outbox).start()
    try:
        wait_for_fast(lambda: reporter.worker_id is not None, 15, "registration")
        port, first = coordinator.port, reporter.worker_id
        coordinator.stop()
        coordinator = RunningCoordinator(settings(tmp_path, db="fresh.sqlite"), port=port).start()
        outbox.add(record(3))
        wait_for_fast(
            lambda: outbox.depth() == 0 and reporter.worker_id not in (None, first), 15, "re-registration"
        )
        assert [r["tokens"] for r in coordinator.store.usage_records()] == [3]
    finally:
        reporter.stop()
        coordinator.stop()


def test_registers_while_joining_then_updates_the_registration(tmp_path, identity, caplog):
    """A worker registers before it knows its blocks (null) and beats "joining" with its phase; when
    facts arrive, update_registration() registers again (same worker id) and beats at once, not an
    interval later. A refused update leaves the worker registered and beating, and is tried again."""
    caplog.set_level(logging.INFO, logger="farworker.reporting")
    facts = {"blocks": None, "total_blocks": None, "state": "joining", "location": "Test Lab"}

    def registration_now():
        return dict(
            registration(identity),
            blocks=facts["blocks"],
            total_blocks=facts["total_blocks"],
            location=facts["location"],
        )

    def heartbeat_now():
        payload = dict(heartbeat(state=facts["state"]), blocks=facts["blocks"])
        return dict(payload, phase="downloading weights: 1 of 2 GB (50%)") if facts["state"] == "joining" else payload

    slow = Settings(db_path=tmp_path / "coordinator.sqlite", heartbeat_interval_s=60)
    with RunningCoordinator(slow) as coordinator:
        outbox = Outbox(tmp_path / "outbox.sqlite")
        reporter = make_reporter(coordinator.url, identity, outbox, interval=60)
        reporter._registration, reporter._heartbeat_payload = registration_now, heartbeat_now
        reporter.start()
        try:
            wait_for_fast(lambda: reporter.last_heartbeat is not None, 15, "registration and a first beat")
            worker_id = reporter.worker_id
            row = coordinator.store.worker_row(worker_id)
            assert (row["block_start"], row["block_end"], row["total_blocks"]) == (None, None, None)
            [beat] = coordinator.store.heartbeats(worker_id)
            assert beat["state"] == "joining" and beat["blocks"] is None and beat["phase"].endswith("(50%)")

            def beats() -> int:
                return len(coordinator.store.heartbeats(worker_id))

            facts.update(location="x" * 500)  # a registration the coordinator refuses (422)
            reporter.update_registration()
            wait_for_fast(lambda: beats() == 2, 10, "a beat at once, though the update was refused")
            assert reporter.worker_id == worker_id and reporter._registration_stale
            assert any("retrying at the next heartbeat" in r.message for r in caplog.records)

            facts.update(blocks=[0, 2], total_blocks=4, state="online", location="Test Lab")
            reporter.beat_now()
            wait_for_fast(lambda: beats() == 3, 10, "the update sent before the next beat")
            row = coordinator.store.worker_row(worker_id)
            assert (row["block_start"], row["block_end"], row["total_blocks"]) == (0, 2, 4)
            assert row["state"] == "online" and reporter.worker_id == worker_id
            assert not reporter._registration_stale and reporter.stats["register_attempts"] == 3
            assert coordinator.store.heartbeats(worker_id)[-1]["phase"] is None
            assert any("registration updated" in r.message for r in caplog.records)
            time.sleep(0.5)
            assert beats() == 3  # and then back to the 60 s interval
        finally:
            reporter.stop()


def test_drain_flushes_and_deregisters(tmp_path, identity):
    with RunningCoordinator(settings(tmp_path)) as coordinator:
        outbox = Outbox(tmp_path / "outbox.sqlite")
        reporter = make_reporter(coordinator.url, identity, outbox, interval=60).start()
        wait_for_fast(lambda: reporter.last_heartbeat is not None, 15, "registration")
        reporter._api_retry_at = time.monotonic() + 60  # hold flushes back: drain must do it
        for i in range(60):
            outbox.add(record(i + 1))
        assert reporter.drain_and_stop(timeout=10) is True
        assert outbox.depth() == 0 and reporter.state == "stopped"
        view = coordinator.store.worker_row(reporter.worker_id)
        assert view["state"] == "offline"
        assert coordinator.store.heartbeats(reporter.worker_id)[-1]["state"] == "draining"
        assert len(coordinator.store.usage_records()) == 60


def test_drain_with_the_coordinator_down_is_bounded(tmp_path, identity):
    coordinator = RunningCoordinator(settings(tmp_path)).start()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    reporter = make_reporter(coordinator.url, identity, outbox).start()
    wait_for_fast(lambda: reporter.worker_id is not None, 15, "registration")
    coordinator.stop()
    outbox.add(record(4))
    started = time.monotonic()
    assert reporter.drain_and_stop(timeout=3) is False
    assert time.monotonic() - started < 4
    assert outbox.depth() == 1  # kept for the next start


def test_poison_record_is_set_aside(tmp_path, identity):
    with RunningCoordinator(settings(tmp_path)) as coordinator:
        outbox = Outbox(tmp_path / "outbox.sqlite")
        good = [record(2) for _ in range(3)]
        # valid for the outbox, refused by the coordinator (a session id over 256 characters)
        poison = dict(record(1), session_id="x" * 300)
        outbox.add(good[0])
        outbox.add(poison)
        outbox.add(good[1])
        outbox.add(good[2])
        reporter = make_reporter(coordinator.url, identity, outbox).start()
        try:
            wait_for_fast(lambda: outbox.depth() == 0, 15, "good records through")
            assert sorted(r["id"] for r in coordinator.store.usage_records()) == sorted(r["id"] for r in good)
            assert [r["id"] for r in outbox.rejected()] == [poison["id"]]
        finally:
            reporter.stop()


_WORKER = textwrap.dedent("""
    import sys, time
    from farworker.api_client import CoordinatorClient
    from farworker.identity import load_or_create
    from farworker.outbox import Outbox
    from farworker.reporting import Reporter
    sys.path.insert(0, sys.argv[4])
    from coordinator_fixtures import heartbeat, registration

    url, state_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    identity = load_or_create(state_dir + "/identity.key")
    outbox = Outbox(state_dir + "/outbox.sqlite")
    reporter = Reporter(CoordinatorClient(url, identity, timeout=5), outbox, lambda: registration(identity),
                        lambda: heartbeat(), interval=30, batch_size=10, backoff_initial_s=0.05,
                        backoff_max_s=0.2, flush_delay_s=0.0).start()
    print("started", flush=True)
    deadline = time.monotonic() + 60
    while outbox.depth() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("drained" if reporter.drain_and_stop(10) else "not drained", flush=True)
""")


def test_sigkill_mid_flush_then_restart_loses_and_doubles_nothing(tmp_path):
    state = tmp_path / "state"
    outbox = Outbox(state / "outbox.sqlite")
    records = [record(i % 5 + 1) for i in range(1500)]
    for r in records:
        outbox.add(r)
    outbox.close()
    tests_dir = str(Path(__file__).parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    )
    with RunningCoordinator(settings(tmp_path)) as coordinator:
        args = [sys.executable, "-c", _WORKER, coordinator.url, str(state), "run", tests_dir]
        first = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        try:
            wait_for_fast(lambda: len(coordinator.store.usage_records()) >= 200, 90, "flush under way")
            os.kill(first.pid, signal.SIGKILL)
        finally:
            first.kill()
            first.wait(10)
        sent_before_kill = len(coordinator.store.usage_records())
        assert 0 < sent_before_kill < len(records), "the kill must land mid-flush"
        second = subprocess.run(args, stdout=subprocess.PIPE, text=True, env=env, timeout=60)
        assert second.stdout.split() == ["started", "drained"]
        ledger = coordinator.store.usage_records()
        assert len(ledger) == len(records)
        assert sorted(r["id"] for r in ledger) == sorted(r["id"] for r in records)
        assert sum(r["tokens"] for r in ledger) == sum(r["tokens"] for r in records)
        assert Outbox(state / "outbox.sqlite").depth() == 0
        rows = [coordinator.store.worker_row(w) for w in coordinator.store.worker_ids()]
        assert len(rows) == 1 and rows[0]["state"] == "offline"  # same identity, same worker after restart
