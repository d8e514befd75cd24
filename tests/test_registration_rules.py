"""Which models a coordinator takes registrations for, over HTTP (the rule itself: services/workers.check_model)."""

from __future__ import annotations

from coordinator_fixtures import registration, signed_post

from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.settings import Settings
from farworker.identity import Identity


def test_a_coordinator_started_with_a_model_name_only_refuses_another_model(tmp_path):
    """`farworker coordinator --model-name X` without --model-path: a worker of another model would be paid for
    blocks nobody routes to (issue 18)."""
    key = Identity.generate()
    with RunningCoordinator(Settings(db_path=tmp_path / "c.sqlite", model_name="farworker-tiny-llama")) as running:
        refused = signed_post(running.url, key, "/v1/workers/register",
                              registration(key, model_name="meta-llama/Llama-2-70b-chat-hf"))
        assert refused.status_code == 400, refused.text
        assert refused.json()["field"] == "model_name" and "farworker-tiny-llama" in refused.json()["error"]
        assert running.store.counts()["workers"] == 0
        ok = signed_post(running.url, key, "/v1/workers/register", registration(key))
        assert ok.status_code == 200, ok.text
