"""Reachability: with each spot check the coordinator dials a worker's announced addresses itself, directly (no
relay), and tells the worker when none answers: its journal, `farworker status` and `farworker check` say
"not reachable from the coordinator" and name the addresses tried.

A real worker announcing a loopback port nobody listens on (what a wrong FARLABS_ANNOUNCE_MADDRS or a closed
port forwarding gives) against an honest worker announcing where it listens.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import requests
from polling import wait_for

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.local_mesh import base_env
from farworker.petals.compat import dial_directly
from farworker.tiny_model import TINY_MODEL_NAME

pytestmark = pytest.mark.slow


def closed_loopback_port() -> int:
    with socket.socket() as sock:  # bound, never listening, then released: nothing answers there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_direct_dial_proves_the_peer_at_the_address(bootstrap_peer):
    """The right peer id at its address connects; the same address for another peer id (libp2p's handshake
    checks the key) and a closed port do not."""
    address = bootstrap_peer[0]
    peer_id = address.rsplit("/", 1)[-1]
    other_id = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    host_port = address.split("/p2p/")[0]
    closed = f"/ip4/127.0.0.1/tcp/{closed_loopback_port()}"
    assert dial_directly(peer_id, [address, host_port], timeout=5.0) == {address: None, host_port: None}
    wrong = dial_directly(other_id, [host_port, closed], timeout=5.0)
    assert wrong[host_port] is not None and wrong[closed] is not None, wrong
    assert "names another peer" in dial_directly(other_id, [address], timeout=5.0)[address]


def test_a_worker_announcing_an_unreachable_address_is_told_and_an_honest_one_is_not(
        tmp_path, tiny_model, bootstrap_peer, start_workers):
    settings = Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=tiny_model,
                        model_name=TINY_MODEL_NAME, initial_peers=tuple(bootstrap_peer), probe_period_s=1.0)
    wrong_address = f"/ip4/127.0.0.1/tcp/{closed_loopback_port()}"
    with RunningCoordinator(settings) as coordinator:
        honest = start_workers("reachable", "0:4", bootstrap_peer, api_url=coordinator.url)
        hidden = start_workers("unreachable", "0:4", bootstrap_peer, api_url=coordinator.url,
                               env={"FARLABS_ANNOUNCE_MADDRS": wrong_address})
        honest_id, hidden_id = honest.wait_online()["peer_id"], hidden.wait_online()["peer_id"]

        def view(peer_id):
            workers = requests.get(f"{coordinator.url}/v1/workers", timeout=10).json()["workers"]
            worker = next((w for w in workers if w["peer_id"] == peer_id), None) or {}
            return requests.get(f"{coordinator.url}/v1/workers/{worker['worker_id']}", timeout=10).json() \
                if worker else {}

        wait_for(lambda: view(hidden_id).get("reachable") is False, 90, "the unreachable worker dialled")
        wait_for(lambda: view(honest_id).get("reachable") is True, 60, "the honest worker dialled")
        hidden_view, honest_view = view(hidden_id), view(honest_id)
        assert hidden_view["reachability_problem"].startswith(
            f"not reachable from the coordinator: tried {wrong_address}/p2p/{hidden_id} ("), hidden_view
        assert honest_view["reachability_problem"] is None and honest_view["reachability_checked_at"] > 0

        # the worker hears it in its heartbeat answers: journal, `farworker status`, `farworker check`
        wait_for(lambda: f"not reachable from the coordinator: tried {wrong_address}" in hidden.proc.log_tail(200),
                 30, "the unreachable worker's journal told")
        wait_for(lambda: ((hidden.status() or {}).get("last_heartbeat") or {}).get("answer", {}).get("unreachable"),
                 30, "the status file has the answer")
        status = farworker("status", "--state-dir", str(hidden.state_dir), env=hidden.env)
        assert f"UNREACHABLE    not reachable from the coordinator: tried {wrong_address}" in status.stdout, status
        check = farworker("check", env=hidden.env)
        assert f"WARN reachability: not reachable from the coordinator: tried {wrong_address}" in check.stdout, check
        honest_check = farworker("check", env=honest.env)
        assert "OK   reachability: the coordinator has not reported this worker unreachable" in honest_check.stdout
        assert "UNREACHABLE" not in farworker("status", "--state-dir", str(honest.state_dir), env=honest.env).stdout


def farworker(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "farworker", *args], env=base_env(env), capture_output=True,
                          text=True, timeout=timeout)
