"""Observed uptime: with a mesh view, the coordinator counts a heartbeat interval as up only when the worker beat
in it AND the coordinator's DHT watch saw the worker's whole span ONLINE in it (coordinator/dht_watch.py).

The dishonest worker is a real identity that registers a span and sends valid, signed, healthy heartbeats from
the test process at every interval, while serving nothing in the DHT. Beside it an honest `farworker run` worker
serves the same span. Only the honest one's intervals count, and only while it serves: once it has left the DHT,
beats sent with its identity count no more.
"""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import requests
from coordinator_fixtures import heartbeat, registration
from polling import wait_for

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import Identity, load_or_create
from farworker.tiny_model import TINY_MODEL_NAME

# hivemind's P2P.__del__ complains when the client's daemon is collected after its event loop is gone
FILTER_P2P_DEL = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

INTERVAL = 2.0
WINDOW = 8  # heartbeat intervals the dishonest worker beats for


def view(url: str, worker_id: str) -> dict:
    answer = requests.get(f"{url}/v1/workers/{worker_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def beat_for(client: CoordinatorClient, worker_id: str, intervals: int) -> None:
    """Valid, healthy "online" beats twice per interval (faster buys nothing; no interval goes without one)."""
    deadline = time.monotonic() + intervals * INTERVAL
    while time.monotonic() < deadline:
        client.heartbeat(worker_id, heartbeat(blocks=(0, 4)))
        time.sleep(INTERVAL / 2)


def register_liar(url: str) -> tuple[CoordinatorClient, str]:
    liar = Identity.generate()
    client = CoordinatorClient(url, liar)
    return client, client.register(registration(liar, blocks=(0, 4), total_blocks=4))["worker_id"]


def test_without_a_mesh_view_beats_alone_count_and_the_view_says_so(tmp_path):
    with RunningCoordinator(Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0)) as c:
        client, worker_id = register_liar(c.url)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            client.heartbeat(worker_id, heartbeat(blocks=(0, 4)))
            time.sleep(0.5)
        seen = view(c.url, worker_id)
    assert seen["uptime_basis"] == "beats"
    assert seen["up_intervals"] == seen["heartbeat_count"] >= 2


def test_a_quarantined_worker_earns_no_uptime_from_its_quarantine_on(tmp_path):
    with RunningCoordinator(Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0)) as c:
        client, worker_id = register_liar(c.url)
        for _ in range(6):  # 3 intervals, beating twice in each
            client.heartbeat(worker_id, heartbeat(blocks=(0, 4)))
            time.sleep(0.5)
        before = view(c.url, worker_id)
        # what the spot-check loop records for a wrong answer (spot_check.py)
        c.store.record_probe(worker_id, time.time(), 0, 8, 0.5, 1e-4, "block 0 activations differ", quarantine=True)
        for _ in range(6):
            client.heartbeat(worker_id, heartbeat(blocks=(0, 4)))
            time.sleep(0.5)
        after = view(c.url, worker_id)
    assert before["up_intervals"] >= 2
    assert after["heartbeat_count"] - before["heartbeat_count"] >= 2  # it kept beating validly
    # the interval of the quarantine itself counts for nobody, whatever was counted in it before
    assert after["up_intervals"] in (before["up_intervals"], before["up_intervals"] - 1)
    assert after["reliability"] == 0.0


def test_a_worker_beating_half_the_time_reads_half_and_a_fresh_one_reads_new(tmp_path):
    """The adversary's side of judging uptime from the first up slot over completed slots: a worker that beats in
    every other interval still reads about 50 %, not "new" and not 100 %."""
    with RunningCoordinator(Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0)) as c:
        client, worker_id = register_liar(c.url)
        fresh = view(c.url, worker_id)
        start = time.monotonic()
        for i in range(14):  # 14 intervals, beating in the even ones only
            if i % 2 == 0:
                client.heartbeat(worker_id, heartbeat(blocks=(0, 4)))
            time.sleep(max(0.0, start + (i + 1) * 1.0 - time.monotonic()))
        flaky = view(c.url, worker_id)
    assert fresh["uptime_new"] is True and fresh["up_intervals"] == 0
    assert flaky["uptime_new"] is False and flaky["uptime_intervals"] >= 10
    assert 35.0 <= flaky["uptime_pct"] <= 65.0, flaky
    assert flaky["reliability"] <= 0.65


@pytest.mark.slow
@FILTER_P2P_DEL
def test_beats_without_blocks_online_in_the_dht_earn_no_uptime(tmp_path, tiny_model, bootstrap_peer, start_workers):
    settings = Settings(
        db_path=tmp_path / "coordinator.sqlite3",
        heartbeat_interval_s=INTERVAL,
        model_path=tiny_model,
        model_name=TINY_MODEL_NAME,
        initial_peers=tuple(bootstrap_peer),
        probe_period_s=0,  # uptime only; probes have their own tests
    )
    with RunningCoordinator(settings) as coordinator:
        honest = start_workers("honest", "0:4", bootstrap_peer, api_url=coordinator.url)
        honest.wait_online(timeout=180)
        workers = wait_for(
            lambda: [w for w in requests.get(f"{coordinator.url}/v1/workers", timeout=10).json()["workers"]
                     if w["state"] == "online"],
            60, "the honest worker online at the coordinator",
        )
        honest_id = workers[0]["worker_id"]
        # its intervals count once the watch has seen it ONLINE (the first look comes half an interval in)
        wait_for(lambda: view(coordinator.url, honest_id)["up_intervals"] >= 1, 30, "the honest worker's first up")

        client, liar_id = register_liar(coordinator.url)
        honest_before = view(coordinator.url, honest_id)["up_intervals"]
        beat_for(client, liar_id, WINDOW)
        liar, honest_after = view(coordinator.url, liar_id), view(coordinator.url, honest_id)

        # The honest worker leaves the DHT (stopped: it announces its blocks OFFLINE) while a heartbeat process with
        # its identity keeps beating for it.
        ghost = CoordinatorClient(coordinator.url, load_or_create(honest.state_dir / "identity.key"))
        honest.proc.stop(timeout=30)
        ghost_before = view(coordinator.url, honest_id)
        beat_for(ghost, honest_id, WINDOW // 2)
        ghost_after = view(coordinator.url, honest_id)

    assert liar["uptime_basis"] == honest_after["uptime_basis"] == "beats_and_dht"
    assert liar["state"] == "online"  # what it says; the DHT says otherwise
    assert liar["heartbeat_count"] >= WINDOW - 2  # it did beat validly in (nearly) every interval
    assert liar["up_intervals"] == 0
    assert liar["uptime_pct"] <= 100 / (WINDOW - 1)  # only the registration's own interval
    assert liar["reliability"] <= 1 / (WINDOW - 1)  # what its usage records would be credited at
    # the honest worker earned (nearly) every interval of the same window; a late beat on a loaded machine may
    # miss an interval's boundary
    assert honest_after["up_intervals"] - honest_before >= WINDOW - 3, (honest_before, honest_after)
    # up since it came online (its loading before is not downtime: counted, its many registered-but-loading slots
    # would be missed ones), judged over more than the new worker's slots; a late beat or a slow DHT look may miss
    # a few as above (one of ~10 slots read 90 %, below the 95 % this asked before)
    assert honest_after["uptime_new"] is False, honest_after
    missed = honest_after["uptime_intervals"] - honest_after["up_intervals"]
    assert missed <= 3, (honest_after["up_intervals"], honest_after["uptime_intervals"])
    assert liar["uptime_new"] is True  # never seen up
    # its beats after it left count as beats, not as uptime (but for the interval it stopped in)
    assert ghost_after["heartbeat_count"] - ghost_before["heartbeat_count"] >= WINDOW // 2 - 2
    assert ghost_after["up_intervals"] - ghost_before["up_intervals"] <= 1, (ghost_before, ghost_after)


def test_a_dht_watch_that_cannot_start_its_mesh_client_says_why_once(tmp_path, tiny_model, bootstrap_peer, caplog):
    """A checkpoint without its weights (or, as in the fleet's first run, with weights the service user may not read)
    fails every look: the journal gets the reason once, not twice per heartbeat interval for as long as it lasts."""
    checkpoint = tmp_path / TINY_MODEL_NAME
    checkpoint.mkdir()
    for item in tiny_model.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, checkpoint / item.name)
    settings = Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=0.2, model_path=checkpoint,
                        model_name=TINY_MODEL_NAME, probe_period_s=0, initial_peers=(bootstrap_peer[0],))
    with caplog.at_level(logging.INFO, logger="farworker.coordinator.dht_watch"), RunningCoordinator(settings) as c:
        register_liar(c.url)  # a worker to look for: the watch looks only when there is one
        wait_for(lambda: any("could not read the DHT" in r.getMessage() for r in caplog.records), 60, "a failed look")
        time.sleep(2.0)  # 20 more looks, each failing the same way
    said = [r.getMessage() for r in caplog.records if "could not read the DHT" in r.getMessage()]
    assert len(said) == 1 and "cannot start the mesh client" in said[0], said
