"""A worker whose state dir is full (its outbox's SQLite writes fail) keeps serving: the usage it cannot write
is held in memory, `farworker status` and the journal say so, and it is written once there is space; the
ledger then equals what the mesh route says each worker served, nothing lost or doubled.

The state dir is a real 8 MiB tmpfs this test mounts (root only), filled with a file until ENOSPC.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from polling import wait_for
from small_fs import fill, small_dir_fixture  # noqa: F401 (the small_dir fixture)

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.local_mesh import base_env, start_bootstrap_peer, start_worker, stop_all
from farworker.threading_policy import apply_thread_policy
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.faults,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]


def test_a_full_state_dir_holds_usage_in_memory_and_writes_it_once_there_is_space(tmp_path, small_dir):
    apply_thread_policy("passive")
    model = ensure_tiny_checkpoint()
    bootstrap, peers = start_bootstrap_peer(tmp_path)
    coordinator = RunningCoordinator(Settings(
        db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=model,
        model_name=TINY_MODEL_NAME, initial_peers=tuple(peers), probe_period_s=0)).start()
    state = small_dir / "state"
    workers = [start_worker(tmp_path, "full", coordinator.url, peers, "0:2", {"FARLABS_STATE_DIR": str(state)}),
               start_worker(tmp_path, "roomy", coordinator.url, peers, "2:4")]
    served: dict[str, int] = {}
    try:
        for worker in workers:
            worker.wait_online(timeout=180)
        filler = fill(small_dir)
        for prompt in ([1, 37, 101, 250], [5, 6, 7, 8, 9, 10], [300, 2, 44], [9, 8, 7]):
            answer = requests.post(f"{coordinator.url}/v1/completions", json={"prompt": prompt, "max_tokens": 6},
                                   timeout=120)
            assert answer.status_code == 200, answer.text  # serving goes on
            for span in answer.json()["route"]:
                served[span["peer_id"]] = served.get(span["peer_id"], 0) + span["tokens"]

        full = workers[0]
        held = wait_for(lambda: ((full.status() or {}).get("usage_held") or {}).get("held_in_memory"), 30,
                        "the full worker's status says it holds usage in memory")
        assert held > 0
        shown = subprocess.run([sys.executable, "-m", "farworker", "status", "--state-dir", str(state)],
                               env=base_env(), capture_output=True, text=True, timeout=60)
        assert "STATE DIR FULL" in shown.stdout and "usage records held in memory" in shown.stdout, shown.stdout
        assert "refuses writes" in full.proc.log_path.read_text()  # the journal says it once

        filler.unlink()  # space again: the held records are written, then sent
        wait_for(lambda: ((full.status() or {}).get("usage_held") or {}).get("held_in_memory") == 0, 30,
                 "held records written")

        def ledger() -> dict[str, int]:
            listed = requests.get(f"{coordinator.url}/v1/workers", timeout=10).json()["workers"]
            return {w["peer_id"]: w["tokens_served"] for w in listed}

        wait_for(lambda: ledger() == served, 60, f"ledger == {served}")
        assert "state dir writable again" in full.proc.log_path.read_text()
        assert full.status()["usage_held"]["held_dropped"] == 0
        wait_for(lambda: full.status()["outbox_depth"] == 0, 30, "the full worker's outbox sent")
        assert ledger() == served  # nothing lost, nothing doubled
    finally:
        stop_all((worker.proc for worker in workers), timeout=30)
        coordinator.stop()
        bootstrap.stop()
