"""lm-evaluation-harness scores the mesh like the model itself: its `local-completions` model (echo + logprobs
through the coordinator's /v1/completions, the official `openai` client underneath) and its `hf` model (local
transformers, float32) run the repository's small multiple-choice task (tests/eval_task/, a local jsonl: no hub
download) on the tiny checkpoint, and get the same accuracy and the same log-likelihood for every choice. Runs on
test_mesh_ledger's mesh (two `farworker run` workers splitting the tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_mesh_ledger
from eval_task import lm_eval_offline

from farworker.tiny_model import TINY_MODEL_NAME

pytestmark = test_mesh_ledger.pytestmark
mesh = test_mesh_ledger.mesh  # the same fixture: one mesh for this module

TASK_DIR = Path(__file__).resolve().parent / "eval_task"
TASK = "farworker_mc"
# float32 on both sides; the mesh's blocks and the local model sum in other orders: ~1e-6 apart per token
LOGLIKELIHOOD_TOLERANCE = 1e-4


def evaluate(model: str, model_args: str) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], batch_size=4,
                                   log_samples=True, bootstrap_iters=0)


def loglikelihoods(results: dict) -> dict[int, list[float]]:
    """Per item, each choice's log-likelihood (lm-eval's is_greedy aside: 0.4.1's local-completions gets it wrong
    for any server, comparing a token's text with a float)."""
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"][TASK]}


def test_lm_eval_local_completions_through_the_mesh_equals_its_hf_model(mesh, monkeypatch, tmp_path):
    monkeypatch.chdir(TASK_DIR)  # the data file and exact_match/ (tests/eval_task/exact_match/) are found here
    for name, value in lm_eval_offline.offline_environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # lm-eval's client reads it; this coordinator has no keys
    datasets_builder = pytest.importorskip("datasets.builder", reason="lm-eval is in requirements/eval.txt")
    monkeypatch.setattr(datasets_builder, "is_remote_filesystem", lm_eval_offline.is_remote_filesystem)
    from lm_eval.tasks import TASK_REGISTRY, include_path

    if TASK not in TASK_REGISTRY:  # once per process: lm-eval refuses a second registration
        include_path(str(TASK_DIR))
    through_mesh = evaluate("local-completions", f"model={TINY_MODEL_NAME},base_url={mesh.url}/v1,"
                                                 f"tokenizer_backend=huggingface,tokenizer={mesh.model}")
    local = evaluate("hf", f"pretrained={mesh.model},dtype=float32,device=cpu")
    mesh_ll, local_ll = loglikelihoods(through_mesh), loglikelihoods(local)
    assert sorted(mesh_ll) == sorted(local_ll) == list(range(36))
    for doc, expected in local_ll.items():
        assert len(mesh_ll[doc]) == len(expected) == 4
        for got, want in zip(mesh_ll[doc], expected, strict=True):
            assert abs(got - want) <= LOGLIKELIHOOD_TOLERANCE, (doc, mesh_ll[doc], expected)
    assert through_mesh["results"][TASK]["acc,none"] == local["results"][TASK]["acc,none"]
    print(f"accuracy {local['results'][TASK]['acc,none']:.4f} both; log-likelihoods of item 0: mesh "
          f"{mesh_ll[0]}, hf {local_ll[0]}")
