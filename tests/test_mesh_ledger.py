"""End to end with real petals: `farworker run` workers, the reference coordinator, completions through the
mesh. The ledger's tokens per worker must equal the tokens the mesh route says each worker processed,
through a coordinator outage and a worker SIGKILL, with nothing lost or doubled.

One mesh for the module (bootstrap peer + two workers splitting the tiny model); the tests run in order
and keep a running total of the tokens each worker served.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
from coordinator_fixtures import two_workers_serving
from polling import wait_for

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.local_mesh import start_bootstrap_peer, start_worker
from farworker.threading_policy import apply_thread_policy
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint

# hivemind's P2P.__del__ complains when the client's daemon is collected after its event loop is gone
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

INTERVAL = 1.0
PROMPTS = [[1, 37, 101, 250], [5, 6, 7, 8, 9, 10], [300, 2, 44]]




class Mesh:
    def __init__(self, work, model, peers):
        self.work, self.model, self.peers = work, model, peers
        self.coordinator: RunningCoordinator | None = None
        self.port = 0
        self.workers = []
        self.served = Counter()  # peer id -> tokens the mesh route says it processed

    def start_coordinator(self) -> RunningCoordinator:
        self.coordinator = RunningCoordinator(
            Settings(
                db_path=self.work / "coordinator.sqlite3",
                heartbeat_interval_s=INTERVAL,
                model_path=self.model,
                model_name=TINY_MODEL_NAME,
                initial_peers=tuple(self.peers),
                probe_period_s=0,  # exact claims == routes here; probes are work too (test_spot_checks.py)
            ),
            port=self.port,
        ).start()
        self.port = self.coordinator.port
        return self.coordinator

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def complete(self, prompt, max_tokens) -> dict:
        answer = requests.post(
            f"{self.url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        for span in body["route"]:
            self.served[span["peer_id"]] += span["tokens"]
        return body

    def ledger(self) -> dict[str, int]:
        workers = requests.get(f"{self.url}/v1/workers", timeout=10).json()["workers"]
        return {w["peer_id"]: w["tokens_served"] for w in workers}

    def wait_ledger_matches(self, timeout: float = 60) -> None:
        expected = {peer: tokens for peer, tokens in self.served.items() if tokens}
        wait_for(lambda: self.ledger() == expected, timeout, f"ledger == {expected} (now {self.ledger()})")
        time.sleep(2 * INTERVAL)  # and it stays there: nothing arrives twice
        assert self.ledger() == expected


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    apply_thread_policy("passive")
    work = tmp_path_factory.mktemp("mesh")
    model = ensure_tiny_checkpoint()
    bootstrap, peers = start_bootstrap_peer(work)
    mesh = Mesh(work, model, peers)
    with two_workers_serving(mesh, bootstrap):
        yield mesh


def test_round_trip_heartbeats_and_ledger(mesh):
    c = mesh.coordinator

    def steady_beats(worker_id: str) -> list[dict]:
        """The online beats but the first: that one goes out at once when the blocks come online
        (Reporter.beat_now), off the cadence, as does the joining beat after the second registration."""
        return [b for b in c.store.heartbeats(worker_id) if b["state"] == "online"][1:]

    workers = wait_for(
        lambda: (
            (ws := requests.get(f"{mesh.url}/v1/workers", timeout=10).json()["workers"])
            and len(ws) == 2
            and all(w["state"] == "online" and len(steady_beats(w["worker_id"])) >= 5 for w in ws)
            and ws
        ),
        60,
        "two online workers with heartbeats",
    )
    assert sorted(tuple(w["blocks"]) for w in workers) == [(0, 2), (2, 4)]
    assert all(w["total_blocks"] == 4 for w in workers)
    for w in workers:
        assert c.store.heartbeats(w["worker_id"])[0]["state"] == "joining"  # registered before online
        beats = steady_beats(w["worker_id"])
        # when the worker made each beat (its uptime then), not when the busy in-process coordinator took it
        made = [b["uptime_seconds"] for b in beats]
        gaps = [b - a for a, b in zip(made, made[1:], strict=False)]
        # at the coordinator's interval, on a grid from the registration (reporting.next_beat_time): never faster
        # (a beat late on a loaded machine is followed by the next on the grid, sooner than an interval after it,
        # so the count tells, not each gap), late only as far as a loaded machine makes it
        assert gaps and len(gaps) <= sum(gaps) / INTERVAL + 1, gaps
        assert sorted(gaps)[len(gaps) // 2] <= 2 * INTERVAL, gaps
        last = beats[-1]
        assert last["state"] == "online" and last["gpus"] == []  # a CPU host: empty telemetry list
        assert set(last["counters"]) == {"requests", "inference_steps", "tokens_processed", "errors"}
        assert last["uptime_seconds"] > 0

    for prompt, max_tokens in zip(PROMPTS, [8, 5, 12], strict=True):
        body = mesh.complete(prompt, max_tokens)
        route = body["route"]
        assert sorted(tuple(s["blocks"]) for s in route) == [(0, 2), (2, 4)]
        assert all(s["worker_id"] for s in route)  # the coordinator knows who served
        generated = body["usage"]["completion_tokens"]
        # every span processed the prompt and each generated token but the last
        assert all(s["tokens"] == len(prompt) + generated - 1 for s in route)
    mesh.wait_ledger_matches()
    view = requests.get(f"{mesh.url}/v1/workers", timeout=10).json()["workers"]
    assert all(w["earnings_far"] > 0 and w["earn_rate_far_per_hour"] > 0 for w in view)
    # the coordinator vouches for its own completions by recording their routes: attested, no receipts needed
    for w in view:
        assert w["tokens_attested"] == w["tokens_served"] and w["tokens_vouched"] == 0 and w["unvouched_tokens"] == 0
        assert w["earnings_far"] == pytest.approx(w["claimed_far"])


def test_a_broken_session_is_run_again_and_both_attempts_are_billed(mesh):
    """A session that breaks after the workers served it (petals' "Broken input cache" when a draining
    worker's session is re-routed) is run once more in a fresh session; the route keeps both attempts,
    because both were served and both are in the workers' usage."""
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient

    client = MeshClient(mesh.model, mesh.peers, TINY_MODEL_NAME)
    real_generate_once = client._generate_once
    attempts = []

    def break_the_first_session(*args):
        attempts.append(real_generate_once(*args))
        if len(attempts) == 1:
            raise RuntimeError("Broken input cache (injected after the workers served the session)")
        return attempts[-1]

    client._generate_once = break_the_first_session
    prompt, max_tokens = [7, 70, 170], 6
    try:
        result = client.generate(prompt, max_tokens=max_tokens, temperature=0)
    finally:
        client.close()
    assert len(attempts) == 2
    assert attempts[0].tolist() == attempts[1].tolist()  # greedy: the retry answers the same
    per_attempt = len(prompt) + len(result.completion_ids) - 1
    by_span = Counter()
    for span in result.route:
        by_span[tuple(span["blocks"])] += span["tokens"]
        mesh.served[span["peer_id"]] += span["tokens"]
    assert by_span == {(0, 2): 2 * per_attempt, (2, 4): 2 * per_attempt}, result.route
    mesh.wait_ledger_matches()


@pytest.mark.faults  # stops the coordinator: .ci/run's fault step, not the README's test command
def test_outage_while_clients_generate(mesh):
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient

    client = MeshClient(mesh.model, mesh.peers, TINY_MODEL_NAME)
    try:
        client.warm()
        mesh.coordinator.stop()
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 4 * INTERVAL:  # several heartbeat intervals
            result = client.generate([11, 12, 13], max_tokens=6, temperature=0)
            for span in result.route:
                mesh.served[span["peer_id"]] += span["tokens"]
        wait_for(
            lambda: all((w.status() or {}).get("outbox_depth", 0) > 0 for w in mesh.workers),
            30,
            "usage waiting in both outboxes",
        )
    finally:
        client.close()
    mesh.start_coordinator()
    mesh.wait_ledger_matches()


@pytest.mark.faults  # kills a worker: .ci/run's fault step, not the README's test command
def test_worker_sigkill_then_restart_loses_and_doubles_nothing(mesh):
    victim = mesh.workers[0]
    mesh.coordinator.stop()  # so the victim's latest usage is still in its outbox when it dies
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient

    client = MeshClient(mesh.model, mesh.peers, TINY_MODEL_NAME)
    try:
        client.warm()
        for prompt in PROMPTS:
            for span in client.generate(prompt, max_tokens=5, temperature=0).route:
                mesh.served[span["peer_id"]] += span["tokens"]
    finally:
        client.close()
    wait_for(lambda: (victim.status() or {}).get("outbox_depth", 0) > 0, 30, "usage in the victim's outbox")
    victim.proc.kill()  # SIGKILL to the whole process group
    mesh.start_coordinator()
    restarted = start_worker(mesh.work, victim.proc.name, mesh.url, mesh.peers, "0:2")
    mesh.workers[0] = restarted
    restarted.wait_online(timeout=180)
    mesh.wait_ledger_matches()
    # same identity after the restart: still two workers, not three
    assert len(requests.get(f"{mesh.url}/v1/workers", timeout=10).json()["workers"]) == 2
