"""/v1/completions beyond greedy token ids: text prompts, temperature sampling, the route the coordinator
records, and refused payloads. Runs on test_mesh_ledger's module-scoped mesh (a bootstrap peer, two
`farworker run` workers splitting the tiny model, the real coordinator on loopback); every completion
here goes through the coordinator, so the store's routes must add up to the workers' ledger.
"""

from __future__ import annotations

import sqlite3

import pytest
import requests
import test_mesh_ledger

from farworker.local_reference import generate_locally
from farworker.tiny_model import TINY_CONFIG

pytestmark = test_mesh_ledger.pytestmark
mesh = test_mesh_ledger.mesh  # the same fixture: one mesh for this module

VOCAB = TINY_CONFIG["vocab_size"]
PROMPT = [1, 37, 101, 250]
NEW_TOKENS = 6


def post(mesh, payload: dict) -> requests.Response:
    return requests.post(f"{mesh.url}/v1/completions", json=payload, timeout=120)


def complete(mesh, **payload) -> dict:
    """A completion that must succeed; checks what was stored for it and counts what each worker served."""
    answer = post(mesh, payload)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    tokens = body["choices"][0]["token_ids"]
    usage = body["usage"]
    assert usage["completion_tokens"] == len(tokens) and 1 <= len(tokens) <= payload["max_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(0 <= t < VOCAB for t in tokens), tokens

    route = body["route"]
    assert sorted(tuple(s["blocks"]) for s in route) == [(0, 2), (2, 4)]
    assert all(s["worker_id"] for s in route)
    # each span processed the prompt and every returned token but the last: what the workers bill
    assert all(s["tokens"] == usage["prompt_tokens"] + len(tokens) - 1 for s in route), (usage, route)
    assert stored_route(mesh, body["id"]) == route  # span by span, in order
    assert stored_completion(mesh, body["id"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    for span in route:
        mesh.served[span["peer_id"]] += span["tokens"]
    return body


def stored_route(mesh, completion_id: str) -> list[dict]:
    return [
        {
            "peer_id": row["peer_id"],
            "worker_id": row["worker_id"],
            "blocks": [row["block_start"], row["block_end"]],
            "tokens": row["tokens"],
        }
        for row in mesh.coordinator.store.completion_routes()
        if row["completion_id"] == completion_id
    ]


def stored_completion(mesh, completion_id: str) -> tuple[int, int] | None:
    db = mesh.coordinator.settings.db_path
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT prompt_tokens, completion_tokens FROM completions WHERE id = ?", (completion_id,)
        ).fetchone()
    return row


def completions_stored(mesh) -> tuple[int, int]:
    counts = mesh.coordinator.store.counts()
    return counts["completions"], counts["completion_route"]


def assert_refused(answer: requests.Response, status: int, field: str) -> dict:
    """An OpenAI-shaped error naming the field: {"error": {"message", "type", "param", "code"}}."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == field, error
    assert error["code"] == "invalid_payload" and error["type"] == "invalid_request_error", error
    assert field in error["message"] and "\n" not in error["message"], error
    return error


def test_greedy_temperature_zero_and_the_default_agree_with_local_transformers(mesh):
    explicit = complete(mesh, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    default = complete(mesh, prompt=PROMPT, max_tokens=NEW_TOKENS)
    expected = generate_locally(str(mesh.model), PROMPT, NEW_TOKENS)
    assert explicit["choices"][0]["token_ids"] == default["choices"][0]["token_ids"] == expected
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(mesh.model)).decode(expected, skip_special_tokens=True)
    assert explicit["choices"][0]["text"] == text  # token ids in, token ids and their text out


def test_a_text_prompt_goes_through_the_tiny_models_tokenizer(mesh):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mesh.model))
    ids = tokenizer("Hello, mesh")["input_ids"]
    assert tokenizer.decode(ids) == "Hello, mesh"  # byte-level: every text round-trips
    body = complete(mesh, prompt="Hello, mesh", max_tokens=NEW_TOKENS)
    expected = generate_locally(str(mesh.model), ids, NEW_TOKENS)
    assert body["choices"][0]["token_ids"] == expected
    assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_sampling_returns_valid_tokens_and_the_ledger_bills_exactly_those(mesh):
    greedy = generate_locally(str(mesh.model), PROMPT, NEW_TOKENS)
    sampled = [
        complete(mesh, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=t)["choices"][0]
        for t in (0.7, 1.0, 10.0)
    ]
    for choice in sampled:
        stopped = len(choice["token_ids"]) < NEW_TOKENS or choice["token_ids"][-1] == 2  # eos
        assert choice["finish_reason"] == ("stop" if stopped else "length"), choice
    # Without a seed runs are not reproducible; with 6 tokens from the top 50 of a near-flat distribution,
    # three samples all equal to the greedy answer or to each other mean no sampling.
    runs = [tuple(c["token_ids"]) for c in sampled]
    assert len(set(runs)) > 1 and any(list(run) != greedy for run in runs), runs
    mesh.wait_ledger_matches()


def test_a_temperature_far_below_one_is_served_not_a_mesh_error(mesh):
    """Logits divided by a temperature this small overflow float32 (inf, then NaN probabilities): it must
    answer as greedy, the limit of sampling as the temperature goes to 0, not fail in the mesh."""
    body = complete(mesh, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=1e-40)
    assert body["choices"][0]["token_ids"] == generate_locally(str(mesh.model), PROMPT, NEW_TOKENS)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": PROMPT, "max_new_tokens": 4}, "max_new_tokens"),  # not this API's name
        ({"prompt": PROMPT, "max_tokens": 4, "temperature": -0.1}, "temperature"),
        ({"prompt": PROMPT, "max_tokens": 4, "temperature": 10.5}, "temperature"),
        ({"prompt": PROMPT, "max_tokens": 4, "temperature": "hot"}, "temperature"),
        ({"prompt": PROMPT, "max_tokens": 4, "seed": -7}, "seed"),
        ({"prompt": PROMPT, "max_tokens": 4, "n": 9}, "n"),  # at most 8 choices
        ({"prompt": PROMPT, "max_tokens": 4, "best_of": 2}, "best_of"),  # not built: refused, not ignored
        ({"prompt": PROMPT, "max_tokens": 4, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "max_tokens": 4, "logprobs": 21}, "logprobs"),
        ({"prompt": [PROMPT, []], "max_tokens": 4}, "prompt"),  # an empty prompt in a list
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": [], "max_tokens": 4}, "prompt"),
        ({"max_tokens": 4}, "prompt"),  # neither text nor token ids
        ({"prompt": None, "max_tokens": 4}, "prompt"),
        ({"prompt": ["Hello", 5], "max_tokens": 4}, "prompt"),  # both, mixed in one list
        ({"prompt": "Hello", "token_ids": PROMPT, "max_tokens": 4}, "token_ids"),  # both, side by side
        ({"prompt": [1, -5], "max_tokens": 4}, "prompt"),
        ({"prompt": [1, 2.5], "max_tokens": 4}, "prompt"),
        ({"prompt": [1, True], "max_tokens": 4}, "prompt"),
        ({"prompt": {"text": "Hello"}, "max_tokens": 4}, "prompt"),
    ],
)
def test_a_malformed_payload_is_refused_naming_the_field_and_nothing_is_stored(mesh, payload, field):
    before = completions_stored(mesh)
    assert_refused(post(mesh, payload), 400, field)
    assert completions_stored(mesh) == before


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"prompt": [1, VOCAB], "max_tokens": 4}, "prompt"),  # a token id past the vocabulary
        ({"prompt": PROMPT, "max_tokens": TINY_CONFIG["max_position_embeddings"]}, "max_tokens"),
    ],
)
def test_a_payload_the_model_cannot_take_is_refused_naming_the_field(mesh, payload, field):
    before = completions_stored(mesh)
    assert_refused(post(mesh, payload), 400, field)
    assert completions_stored(mesh) == before


def test_the_stored_routes_add_up_to_the_ledger(mesh):
    """Every completion of this module went through the coordinator: per worker, the tokens its recorded
    routes say it served are the tokens the workers' own usage reports put on the ledger."""
    complete(mesh, prompt=[5, 6, 7], max_tokens=4, temperature=1.0)
    mesh.wait_ledger_matches()
    by_peer: dict[str, int] = {}
    for row in mesh.coordinator.store.completion_routes():
        by_peer[row["peer_id"]] = by_peer.get(row["peer_id"], 0) + row["tokens"]
    assert by_peer == dict(mesh.served) == mesh.ledger()
