"""`farworker coordinator --db postgresql://...` end to end: the real command on a real Postgres (the session's,
tests/postgres_server.py), a real `farworker run` worker on the tiny model reporting its usage to it, completions
routed through the mesh. Every token the worker wrote to its outbox is on the ledger once, and stays there through a
restart of the coordinator on the same database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
import requests
from polling import wait_for

from farworker.coordinator.store import Store
from farworker.local_mesh import base_env, farworker_command
from farworker.outbox import Outbox

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

PROMPTS = [([1, 37, 101, 250], 6), ([5, 6, 7], 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_coordinator(port: int, db: str, tiny_model, peers, log) -> subprocess.Popen:
    proc = subprocess.Popen(
        farworker_command("coordinator", "--port", str(port), "--db", db, "--model-path", str(tiny_model),
                          "--initial-peer", peers[0], "--probe-period", "0", "--heartbeat-interval", "1"),
        env=base_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/v1/workers"), 60,
             "the coordinator answering")
    assert proc.poll() is None, f"the coordinator exited {proc.returncode}"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_coordinator_on_postgres_takes_a_real_workers_usage_once(tmp_path, postgres_server, start_workers,
                                                                   bootstrap_peer, tiny_model):
    db = postgres_server.new_database()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "coordinator.log", "wb") as log:
        coordinator = start_coordinator(port, db, tiny_model, bootstrap_peer, log)
        try:
            worker = start_workers("pg-worker", "0:4", bootstrap_peer, api_url=url)
            peer_id = worker.wait_online()["peer_id"]
            routed = 0
            for prompt, max_tokens in PROMPTS:
                answer = requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens},
                                       timeout=120)
                assert answer.status_code == 200, answer.text
                [span] = answer.json()["route"]
                assert span["peer_id"] == peer_id
                routed += span["tokens"]
            outbox = Outbox(worker.state_dir / "outbox.sqlite3")

            def ledger() -> int:
                [w] = requests.get(f"{url}/v1/workers", timeout=10).json()["workers"]
                return w["tokens_served"]

            # the worker's outbox empties (every record acknowledged) and the ledger holds what the mesh routed
            wait_for(lambda: ledger() == routed and not outbox.pending() and not outbox.open_segments(), 60,
                     f"ledger == {routed} routed tokens and the outbox empty")
            outbox.close()
            stop(coordinator)
            assert coordinator.returncode == 0

            store = Store(db)  # what Postgres holds, read directly: each record once
            records = store.usage_records()
            assert sum(r["tokens"] for r in records) == routed
            assert len({r["id"] for r in records}) == len(records)
            store.close()

            coordinator = start_coordinator(port, db, tiny_model, bootstrap_peer, log)  # restarted on the same db
            assert ledger() == routed
        finally:
            stop(coordinator)
