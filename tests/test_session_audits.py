"""Whole-session audits against real dishonest workers (tests/adversaries/): a bootstrap peer, a coordinator with
probes and routed checks off and every server session audited (audit_share 1.0), and two `farworker run` workers
splitting the tiny model, one of them patched from outside the package.

- decode-skip and decode-noise (on 2:4) compute every prefill honestly, so probes and routed checks pass them;
  each is quarantined at its first audited session, and the honest worker of 0:2 never is.
- an honest int8 worker passes every audit (its error is int8's own, inside its registered tolerance);
- framer (on 0:2) pushes altered outputs to its neighbour: the coordinator's client runs without push and names
  no next server, so the framing has no effect: the client's tokens are transformers' own, and nobody is
  quarantined.
"""

from __future__ import annotations

import gc

import pytest
import requests
from adversary import adversary_env
from coordinator_fixtures import worker_view
from polling import wait_for

from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.settings import Settings
from farworker.local_mesh import start_bootstrap_peer, start_worker
from farworker.local_reference import generate_locally
from farworker.tiny_model import TINY_MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # real workers altered on purpose
PROMPT, NEW_TOKENS = [1, 17, 230, 45, 99, 3], 6


def audit_counts(url: str) -> dict[str, float]:
    counts = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("farworker_coordinator_session_audits_total{"):
            counts[line.split('outcome="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def settled(url: str) -> bool:
    """Every audit chosen so far has ended (one runs at a time)."""
    c = audit_counts(url)
    return c["chosen"] == c["passed"] + c["failed"] + c["dropped"] + c["dropped_memory"] + c["unverifiable"]


class AuditedMesh:
    """A fresh bootstrap peer and coordinator per test: no stale DHT records of an earlier test's workers."""

    def __init__(self, work, tiny_model):
        self.work, self.tiny_model = work, tiny_model
        self.peer, self.peers = start_bootstrap_peer(work)
        settings = Settings(db_path=work / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=tiny_model,
                            model_name=TINY_MODEL_NAME, initial_peers=tuple(self.peers), probe_period_s=0,
                            sample_routed=0.0, audit_share=1.0)
        self.coordinator = RunningCoordinator(settings).start()
        self.url = self.coordinator.url
        self.workers = []

    def serve(self, first_env=None, second_env=None) -> tuple[str, str]:
        for name, span, env in (("first", "0:2", first_env), ("second", "2:4", second_env)):
            self.workers.append(start_worker(self.work, name, self.url, self.peers, span, env))
        return tuple(worker.wait_online(timeout=180)["peer_id"] for worker in self.workers)

    def complete(self) -> requests.Response:
        return requests.post(f"{self.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": NEW_TOKENS},
                             timeout=120)

    def close(self) -> None:
        for worker in self.workers:
            worker.proc.stop(timeout=20)
        self.coordinator.stop()
        self.peer.stop()


@pytest.fixture
def mesh(tmp_path, tiny_model):
    mesh = AuditedMesh(tmp_path, tiny_model)
    yield mesh
    mesh.close()
    # The closed petals client's objects finalize themselves (hivemind's p2p __del__). Collected later, inside
    # pytest's own ast.parse at the end of the session, they broke it (CPython 3.11's AST recursion counter is
    # shared: "SystemError: AST constructor recursion depth mismatch"); collected here, they break nothing.
    gc.collect()


@pytest.mark.parametrize("kind", ["decode-skip", "decode-noise"])
def test_a_worker_cheating_on_decode_steps_is_quarantined_at_its_first_audited_session(mesh, kind):
    honest_id, cheat_id = mesh.serve(second_env=adversary_env(kind))
    answer = mesh.complete()
    assert answer.status_code == 200, answer.text  # the audit never fails the client's request
    assert {span["peer_id"] for span in answer.json()["route"]} == {honest_id, cheat_id}
    wait_for(lambda: settled(mesh.url), 60, "the completion's sessions audited")

    cheat, honest = worker_view(mesh.url, cheat_id), worker_view(mesh.url, honest_id)
    assert cheat["state"] == "quarantined", cheat
    assert "audited session" in cheat["quarantined"] and "differ from the reference at position" in \
        cheat["quarantined"], cheat
    assert honest["quarantined"] is None and honest["state"] == "online", honest
    counts = audit_counts(mesh.url)
    assert counts["chosen"] == 2 and counts["failed"] == 1 and counts["passed"] == 1, counts
    # the failed audit's worst position is a decode step: the prefill was computed honestly
    position = int(cheat["quarantined"].split("at position ", 1)[1].split(" ", 1)[0])
    assert position >= len(PROMPT), cheat["quarantined"]
    wait_for(lambda: "QUARANTINED by the coordinator" in mesh.workers[1].proc.log_tail(400), 30, "the cheat told")
    # settlement (docs/trust.md): a cheat caught at its first audited session keeps nothing, whenever its usage
    # records arrived (before the quarantine: forfeited; after: never paid); the honest neighbour's pay is pending
    wait_for(lambda: worker_view(mesh.url, honest_id)["pending_far"] > 0, 60, "the honest worker's usage credited")
    cheat = worker_view(mesh.url, cheat_id)
    assert cheat["settled_far"] == 0 and cheat["pending_far"] == 0, cheat


def test_a_framer_has_no_effect_on_the_coordinators_sessions(mesh):
    framer_id, neighbour_id = mesh.serve(first_env=adversary_env("framer"))
    expected = generate_locally(str(mesh.tiny_model), PROMPT, NEW_TOKENS)
    for _ in range(3):
        answer = mesh.complete()
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["token_ids"] == expected  # the framing changed nothing
        assert {span["peer_id"] for span in answer.json()["route"]} == {framer_id, neighbour_id}
        wait_for(lambda: settled(mesh.url), 60, "the completion's sessions audited")
    counts = audit_counts(mesh.url)
    assert counts["chosen"] == 6 and counts["passed"] == 6 and counts["failed"] == 0, counts
    for peer_id in (framer_id, neighbour_id):
        view = worker_view(mesh.url, peer_id)
        assert view["quarantined"] is None and view["state"] == "online", view


def test_an_honest_int8_worker_passes_its_audits(mesh):
    """int8 weights (petals' LLM.int8 on CPU) read ~1e-2 of the span's update at their worst position: inside the
    registered precision's tolerance, so audits at every position do not blame honest quantization."""
    float32_id, int8_id = mesh.serve(second_env={"FARLABS_QUANT_TYPE": "int8"})
    for _ in range(3):
        answer = mesh.complete()
        assert answer.status_code == 200, answer.text
        wait_for(lambda: settled(mesh.url), 60, "the completion's sessions audited")
    counts = audit_counts(mesh.url)
    assert counts["chosen"] == 6 and counts["passed"] == 6 and counts["failed"] == 0, counts
    for peer_id in (float32_id, int8_id):
        view = worker_view(mesh.url, peer_id)
        assert view["quarantined"] is None and view["sessions_audited"] == 3, view
