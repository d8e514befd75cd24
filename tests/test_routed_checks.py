"""Routed spot checks against a real dishonest worker: the periodic probes are off, and the coordinator verifies
its own routed completions instead. For a sampled completion it keeps, for one server session chosen at random,
the hidden states its client sent on the session's first step and what the worker returned, recomputes that
span block by block from its own float32 copy, and quarantines a worker whose answer differs.

The mesh is split: an honest worker serves blocks 0:2, an altered one (same model, MLP output projections 2 %
off, announced under the same DHT prefix) serves 2:4, so every completion runs through both.
"""

from __future__ import annotations

import pytest
import requests
from coordinator_fixtures import worker_view
from polling import wait_for
from test_spot_checks import altered_checkpoint

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.tiny_model import TINY_MODEL_NAME

pytestmark = pytest.mark.slow
MAX_COMPLETIONS = 20  # one of two server sessions is checked per completion: the altered one is missed 20 times
# with probability 2^-20
HONEST_CHECKS = 3  # routed checks the honest worker of 0:2 must pass


def routed_check_counts(metrics_text: str) -> dict[str, float]:
    counts = {}
    for line in metrics_text.splitlines():
        if line.startswith("farworker_coordinator_routed_checks_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.faults  # alters a worker: .ci/run's fault step, not the README's test command
def test_routed_requests_quarantine_an_altered_worker_and_not_an_honest_one(tmp_path, tiny_model, bootstrap_peer,
                                                                            start_workers):
    settings = Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=tiny_model,
                        model_name=TINY_MODEL_NAME, initial_peers=tuple(bootstrap_peer), probe_period_s=0,
                        sample_routed=1.0)
    with RunningCoordinator(settings) as coordinator:
        assert coordinator.app.state.spot_checks is None  # no periodic probe: only routed requests are checked
        honest = start_workers("honest", "0:2", bootstrap_peer, api_url=coordinator.url)
        altered_model = altered_checkpoint(tiny_model, tmp_path / "altered")
        altered = start_workers("altered", "2:4", bootstrap_peer, api_url=coordinator.url, env={
            "FARLABS_MODEL_NAME": str(altered_model), "FARLABS_ALLOW_LOCAL_MODEL": "true"})
        honest_id, altered_id = honest.wait_online()["peer_id"], altered.wait_online()["peer_id"]

        def view(peer_id):
            return worker_view(coordinator.url, peer_id)

        def counts():
            return routed_check_counts(requests.get(f"{coordinator.url}/metrics", timeout=10).text)

        def settled():  # every sampled completion verified (or set aside): one verification runs at a time
            c = counts()
            return c["sampled"] == c["verified"] + c["dropped"] + c["unverifiable"]

        def complete(prompt):
            return requests.post(f"{coordinator.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4},
                                 timeout=120)

        served = 0
        # until the altered worker is checked and quarantined (then nothing serves 2:4 any more)
        while served < MAX_COMPLETIONS and not (view(altered_id) or {}).get("quarantined"):
            answer = complete([1, 2, 3, 4, 5])
            assert answer.status_code == 200, answer.text  # the check never fails the client's request
            assert {span["peer_id"] for span in answer.json()["route"]} == {honest_id, altered_id}
            served += 1
            # one verification at a time: let it finish, so no capture is dropped and each one is checked
            wait_for(settled, 60, "the sampled completion verified")
        wait_for(lambda: (view(altered_id) or {}).get("quarantined"), 60, "the altered worker quarantined")

        bad, good = view(altered_id), view(honest_id)
        assert bad["state"] == "quarantined", bad
        assert "routed request" in bad["quarantined"] and "differ from the reference" in bad["quarantined"], bad
        assert bad["routed_checks_failed"] == 1 and bad["probes"] == 1  # the failure is recorded as a probe row
        assert good["quarantined"] is None and good["state"] == "online", good
        assert good["routed_checks_failed"] == 0 and good["probes"] == 0, good
        final = counts()
        assert final["failed"] == 1 and final["dropped"] == 0 and final["unverifiable"] == 0, final
        assert final["sampled"] == final["verified"] == served, (final, served)  # one per completion served
        # the honest span was checked whenever it was the one drawn (at random); it passed every time
        assert bad["routed_checks"] == 1 and good["routed_checks"] == final["verified"] - 1, (good, final)
        # the failed check's error: the altered blocks read ~5e-3 of the span's update, float32 tolerance 1e-3
        store = coordinator.store
        errors = [row["error"] for row in store.probes(store.worker_by_peer(altered_id), 10_000)]
        assert len(errors) == 1 and errors[0] > 1e-3, errors
        # the worker hears why in its heartbeat answers
        wait_for(lambda: "QUARANTINED by the coordinator" in altered.proc.log_tail(400), 30, "the worker told")

        # An honest worker takes over 2:4: the coordinator routes nothing more to the altered one, and keeps
        # checking; the honest worker of 0:2 passes every check it draws (float32: the reference's own arithmetic).
        second = start_workers("honest-2", "2:4", bootstrap_peer, api_url=coordinator.url)
        second_id = second.wait_online()["peer_id"]
        wait_for(lambda: complete([5, 4, 3]).status_code == 200, 60, "the mesh client routes through it")
        wait_for(settled, 60, "the sampled completion verified")
        more = 0
        while more < MAX_COMPLETIONS and view(honest_id)["routed_checks"] < HONEST_CHECKS:
            answer = complete([5, 4, 3, 2, 1])
            assert answer.status_code == 200, answer.text
            assert {span["peer_id"] for span in answer.json()["route"]} == {honest_id, second_id}
            more += 1
            wait_for(settled, 60, "the sampled completion verified")
        assert view(honest_id)["routed_checks"] >= HONEST_CHECKS
        for peer_id in (honest_id, second_id):
            good = view(peer_id)
            assert good["quarantined"] is None and good["routed_checks_failed"] == 0, good
        assert counts()["failed"] == 1


def test_captures_beyond_the_queue_are_dropped_and_counted_without_waiting():
    """A burst of sampled completions never blocks a request: beyond the bounded queue a capture is dropped."""
    import threading

    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from farworker.coordinator.spot_check import RoutedChecks
    from farworker.mesh_client import FirstStep

    registry = CollectorRegistry()
    checks = RoutedChecks(checker=None, store=None, share=1.0, max_queued=2, registry=registry)  # thread not started
    hidden = torch.zeros(1, 3, 8)

    def burst():
        for n in range(5):
            checks.submit(FirstStep(f"peer-{n}", (0, 1), f"session-{n}", hidden, hidden))

    submitter = threading.Thread(target=burst, daemon=True)
    submitter.start()
    submitter.join(30)
    assert not submitter.is_alive(), "submit waited on a full queue (nobody verifies here: it would wait forever)"
    counts = routed_check_counts(generate_latest(registry).decode())
    assert counts["sampled"] == 5 and counts["dropped"] == 3 and counts["verified"] == 0, counts
    assert not any(RoutedChecks(None, None, share=0.0).sample() for _ in range(1000))
