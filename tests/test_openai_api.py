"""The coordinator as the official `openai` Python client sees it: models, completions and chat completions,
streamed and not, errors in OpenAI's shape, many requests at once, a bounded queue (429), and a client that
goes away mid-stream; what eval harnesses send (logprobs, echo with max_tokens 0, n choices, lists of prompts) and
lm-evaluation-harness itself. Runs on test_mesh_ledger's mesh (two `farworker run` workers splitting the tiny model,
which has a byte-level tokenizer and Llama-2 chat's template); every answer is compared with local
transformers' greedy output on the same checkpoint.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
import requests
import test_mesh_ledger
from eval_task import lm_eval_offline
from polling import wait_for

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.local_reference import generate_locally
from farworker.tiny_model import TINY_MODEL_NAME

pytestmark = test_mesh_ledger.pytestmark
mesh = test_mesh_ledger.mesh  # the same fixture: one mesh for this module
NEW_TOKENS = 8
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
OTHER_COORDINATORS_ROUTES: Counter = Counter()  # served through the same workers by a test's own coordinator


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(mesh):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(mesh.model))


def local_text(mesh, tokenizer, ids: list[int], n: int = NEW_TOKENS) -> str:
    return tokenizer.decode(generate_locally(str(mesh.model), ids, n), skip_special_tokens=True)


def test_models_lists_the_mesh_model(client):
    assert [m.id for m in client.models.list()] == [TINY_MODEL_NAME]
    assert client.models.retrieve(TINY_MODEL_NAME).id == TINY_MODEL_NAME


def test_text_completion_plain_and_streamed_equal_local_transformers(mesh, client, tokenizer):
    expected = local_text(mesh, tokenizer, tokenizer("Hello mesh")["input_ids"])
    plain = client.completions.create(model=TINY_MODEL_NAME, prompt="Hello mesh", max_tokens=NEW_TOKENS,
                                      temperature=0)
    assert plain.choices[0].text == expected and plain.usage.completion_tokens == NEW_TOKENS
    chunks = list(client.completions.create(model=TINY_MODEL_NAME, prompt="Hello mesh", max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_chat_plain_and_streamed_use_the_chat_template(mesh, client, tokenizer):
    ids = list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    assert tokenizer.decode(ids).startswith("<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nName a colour. [/INST]")
    expected = local_text(mesh, tokenizer, ids)
    plain = client.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content == expected
    assert plain.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, max_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_ends_the_text_before_the_stop_string(mesh, client, tokenizer):
    full = local_text(mesh, tokenizer, tokenizer("12345")["input_ids"], 16)  # '{{\ufffdR\ufffdKsKsKsK'
    stop = "Ks"
    assert full.find(stop) > 3, full  # the greedy completion reaches it after a few characters
    cut = full[: full.find(stop)]
    plain = client.completions.create(model=TINY_MODEL_NAME, prompt="12345", max_tokens=16, temperature=0,
                                      stop=[stop, "never"])
    assert plain.choices[0].text == cut and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 16  # it stopped generating, not only cut the text
    streamed = client.completions.create(model=TINY_MODEL_NAME, prompt="12345", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_sampling_with_a_seed_repeats(client):
    def sample():
        return client.completions.create(model=TINY_MODEL_NAME, prompt=[1, 5, 9], max_tokens=6, temperature=1.0,
                                         top_p=0.9, seed=1234).choices[0].model_extra["token_ids"]

    assert sample() == sample()


# Logprobs from the mesh against local transformers' log-softmax, both float32 on the same checkpoint: the workers'
# blocks and the local model sum in different orders and batch shapes, so they agree to ~1e-6, not bit for bit.
LOGPROB_TOLERANCE = 1e-4
PROMPT_IDS = [1, 37, 101, 250, 7, 64]


def local_logprobs(mesh, ids: list[int]):
    from farworker.local_reference import log_softmax_locally

    return log_softmax_locally(str(mesh.model), ids)


def assert_close(got: float, expected: float) -> None:
    assert abs(got - expected) <= LOGPROB_TOLERANCE, (got, expected)


def test_completion_logprobs_equal_local_log_softmax_plain_and_streamed(mesh, client):
    plain = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT_IDS, max_tokens=NEW_TOKENS, temperature=0,
                                      logprobs=5)
    choice = plain.choices[0]
    completion = choice.model_extra["token_ids"]
    assert completion == generate_locally(str(mesh.model), PROMPT_IDS, NEW_TOKENS)
    local = local_logprobs(mesh, PROMPT_IDS + completion)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == NEW_TOKENS
    # each token's text, special tokens included (the choice's text skips them), and where it starts
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(NEW_TOKENS)]
    for i, token in enumerate(completion):
        row = local[len(PROMPT_IDS) - 1 + i]
        assert_close(logprobs.token_logprobs[i], float(row[token]))
        top = logprobs.top_logprobs[i]  # 5 alternatives and the chosen token, fewer where texts coincide
        assert 1 <= len(top) <= 6
        assert_close(max(top.values()), float(row.max()))
        local_top = row.topk(5).values.tolist()
        assert all(any(abs(value - v) <= LOGPROB_TOLERANCE for v in local_top) for value in top.values()), top
        assert logprobs.token_logprobs[i] == max(logprobs.top_logprobs[i].values())  # greedy: the top token
    chunks = list(client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT_IDS, max_tokens=NEW_TOKENS,
                                            temperature=0, logprobs=5, stream=True))
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == logprobs.token_logprobs


def test_echo_scores_the_prompt_in_one_forward_with_the_same_numbers(mesh, client):
    local = local_logprobs(mesh, PROMPT_IDS)
    scored = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT_IDS, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.model_extra["token_ids"] == [] and scored.usage.completion_tokens == 0
    assert scored.usage.prompt_tokens == len(PROMPT_IDS)
    assert scored.model_extra["route"], "the forward went through the mesh and is attested"
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None  # as OpenAI, vLLM
    assert len(choice.logprobs.tokens) == len(PROMPT_IDS)
    for i in range(1, len(PROMPT_IDS)):
        assert_close(choice.logprobs.token_logprobs[i], float(local[i - 1][PROMPT_IDS[i]]))
    # with tokens to generate: the same prompt numbers, then the completion's, from the same first forward
    both = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT_IDS, max_tokens=3, echo=True, logprobs=0,
                                     temperature=0).choices[0]
    assert len(both.logprobs.token_logprobs) == len(PROMPT_IDS) + 3
    for got, expected in zip(both.logprobs.token_logprobs[1:len(PROMPT_IDS)],
                             choice.logprobs.token_logprobs[1:], strict=True):
        assert_close(got, expected)


def test_echo_of_a_text_prompt_returns_its_text(client):
    scored = client.completions.create(model=TINY_MODEL_NAME, prompt="Hello mesh", max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].text == "Hello mesh"
    assert "".join(scored.choices[0].logprobs.tokens) == "Hello mesh"
    plain = client.completions.create(model=TINY_MODEL_NAME, prompt="Hello mesh", max_tokens=2, echo=True,
                                      temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text.startswith("Hello mesh")
    assert plain.usage.completion_tokens == 2 and plain.usage.prompt_tokens == len("Hello mesh")  # byte tokens


def test_chat_logprobs_equal_local_log_softmax(mesh, client, tokenizer):
    ids = list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    answer = client.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, max_tokens=NEW_TOKENS,
                                            temperature=0, logprobs=True, top_logprobs=3)
    completion = generate_locally(str(mesh.model), ids, NEW_TOKENS)
    local = local_logprobs(mesh, ids + completion)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == NEW_TOKENS
    for i, entry in enumerate(content):
        assert_close(entry.logprob, float(local[len(ids) - 1 + i][completion[i]]))
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert_close(entry.top_logprobs[0].logprob, float(local[len(ids) - 1 + i].max()))
    chunks = list(client.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, max_tokens=NEW_TOKENS,
                                                 temperature=0, logprobs=True, stream=True))
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.logprob for e in content]


def test_n_choices_with_a_seed_are_distinct_and_reproducible(client):
    def sample():
        answer = client.completions.create(model=TINY_MODEL_NAME, prompt=[1, 5, 9], max_tokens=6, temperature=1.0,
                                           n=3, seed=99)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert answer.usage.prompt_tokens == 3  # the prompt once, as OpenAI counts it
        assert answer.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in answer.choices)
        return [c.model_extra["token_ids"] for c in answer.choices]

    first = sample()
    assert all(len(tokens) == 6 and all(0 <= t < 512 for t in tokens) for tokens in first), first
    assert len({tuple(tokens) for tokens in first}) == 3, first  # each its own continuation
    assert sample() == first


def test_n_choices_greedy_are_equal_streamed_too(mesh, client):
    expected = generate_locally(str(mesh.model), [1, 5, 9], 5)
    answer = client.completions.create(model=TINY_MODEL_NAME, prompt=[1, 5, 9], max_tokens=5, temperature=0, n=3)
    assert [c.model_extra["token_ids"] for c in answer.choices] == [expected] * 3
    chat = client.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0, n=2,
                                          stream=True)
    texts = ["", ""]
    for c in chat:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""


def test_a_list_of_prompts_gets_a_choice_each(mesh, client):
    answer = client.completions.create(model=TINY_MODEL_NAME, prompt=[[1, 5, 9], [1, 7]], max_tokens=0, echo=True,
                                       logprobs=1)
    assert [len(c.logprobs.token_logprobs) for c in answer.choices] == [3, 2]
    assert answer.usage.prompt_tokens == 5


@pytest.mark.parametrize("call,param", [
    (lambda c: c.completions.create(model=TINY_MODEL_NAME, prompt="x", n=9), "n"),
    (lambda c: c.completions.create(model=TINY_MODEL_NAME, prompt="x", logprobs=21), "logprobs"),
    (lambda c: c.completions.create(model=TINY_MODEL_NAME, prompt="x", best_of=2), "best_of"),
    (lambda c: c.completions.create(model=TINY_MODEL_NAME, prompt="x", max_tokens=0), "max_tokens"),
    (lambda c: c.completions.create(model=TINY_MODEL_NAME, prompt="x", echo=True, stream=True), "echo"),
    (lambda c: c.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, top_logprobs=2), "top_logprobs"),
    (lambda c: c.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, logprobs=True, top_logprobs=21),
     "top_logprobs"),
    (lambda c: c.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT, n=9), "n"),
    (lambda c: c.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "tool", "content": "x"}]),
     "messages.0.role"),
    (lambda c: c.chat.completions.create(model="gpt-4", messages=CHAT), "model"),
    (lambda c: c.chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT[1:] * 2), "messages"),
])
def test_unsupported_or_bad_fields_are_a_clear_400(client, call, param):
    with pytest.raises(openai.BadRequestError) as refused:
        call(client)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == param, error
    assert param.split(".")[0] in error["message"] and "\n" not in error["message"]


def test_many_requests_at_once_each_get_their_own_answer(mesh, client, tokenizer):
    prompts = [[1, 3 + i, 40 + 7 * i] for i in range(6)]
    answers: dict[int, list[int]] = {}

    def ask(i):
        answer = client.completions.create(model=TINY_MODEL_NAME, prompt=prompts[i], max_tokens=NEW_TOKENS,
                                           temperature=0)
        answers[i] = answer.choices[0].model_extra["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(answers) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        assert answers[i] == generate_locally(str(mesh.model), prompt, NEW_TOKENS), i


def test_beyond_the_queue_a_request_gets_429_with_retry_after(mesh, tmp_path):
    settings = Settings(db_path=tmp_path / "busy.sqlite3", heartbeat_interval_s=2.0, model_path=mesh.model,
                        model_name=TINY_MODEL_NAME, initial_peers=tuple(mesh.peers), probe_period_s=0,
                        max_active_generations=1, max_queued_generations=0)
    with RunningCoordinator(settings) as busy:
        url = f"{busy.url}/v1/completions"
        long = requests.post(url, json={"prompt": [1, 2], "max_tokens": 200, "stream": True}, stream=True, timeout=120)
        next(long.iter_lines())  # the first token: the only slot is taken
        refused = requests.post(url, json={"prompt": [1, 2], "max_tokens": 2}, timeout=30)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        long.close()
        # the slot comes back once the cancelled stream's generation ends
        wait_for(lambda: requests.post(url, json={"prompt": [1, 2], "max_tokens": 2}, timeout=60).status_code == 200,
                 60, "a slot free again")
        for row in busy.store.completion_routes():  # the workers bill these to the mesh's coordinator
            OTHER_COORDINATORS_ROUTES[row["peer_id"]] += row["tokens"]


def test_a_client_that_leaves_mid_stream_cancels_and_the_served_part_is_attested(mesh):
    answer = requests.post(f"{mesh.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 300, "stream": True},
                           stream=True, timeout=120)
    lines = answer.iter_lines()
    first = next(line for line in lines if line.startswith(b"data: "))
    completion_id = __import__("json").loads(first[6:])["id"]
    for _ in range(3):
        next(lines)
    answer.close()

    def stored_route():
        return [r for r in mesh.coordinator.store.completion_routes() if r["completion_id"] == completion_id]

    route = wait_for(stored_route, 60, "the cancelled completion's route stored")
    tokens = {r["tokens"] for r in route}
    assert len(tokens) == 1 and 3 < tokens.pop() < 3 + 300 - 1, route  # cut short, but what was served counts


def test_api_keys_guard_the_api_and_count_usage_per_key(mesh, tokenizer, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# name key\nalice sk-alice-0123456789abcdef\nbob sk-bob-0123456789abcdef0\n")
    from farworker.coordinator.command import read_api_keys

    settings = Settings(db_path=tmp_path / "keys.sqlite3", heartbeat_interval_s=2.0, model_path=mesh.model,
                        model_name=TINY_MODEL_NAME, initial_peers=tuple(mesh.peers), probe_period_s=0,
                        api_keys=read_api_keys(keys_file))
    with RunningCoordinator(settings) as guarded:
        def client_with(key):
            return openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=key, max_retries=0, timeout=120)

        with pytest.raises(openai.AuthenticationError) as refused:
            client_with("sk-nobody-0123456789abcdef").completions.create(model=TINY_MODEL_NAME, prompt=[1, 2],
                                                                          max_tokens=2)
        assert refused.value.body["code"] == "invalid_api_key"
        assert requests.get(f"{guarded.url}/v1/models", timeout=10).status_code == 401
        client_with("sk-alice-0123456789abcdef").completions.create(model=TINY_MODEL_NAME, prompt=[1, 2, 3],
                                                                     max_tokens=4)
        client_with("sk-alice-0123456789abcdef").chat.completions.create(model=TINY_MODEL_NAME, messages=CHAT,
                                                                          max_tokens=2)
        client_with("sk-bob-0123456789abcdef0").completions.create(model=TINY_MODEL_NAME, prompt=[1], max_tokens=3)
        usage = {k["key_name"]: k for k in requests.get(f"{guarded.url}/v1/usage", timeout=10).json()["keys"]}
        chat_prompt = len(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
        assert usage["alice"]["completions"] == 2 and usage["alice"]["completion_tokens"] == 4 + 2
        assert usage["alice"]["prompt_tokens"] == 3 + chat_prompt
        assert (usage["bob"]["completions"], usage["bob"]["prompt_tokens"], usage["bob"]["completion_tokens"]) == (
            1, 1, 3)
        for row in guarded.store.completion_routes():
            OTHER_COORDINATORS_ROUTES[row["peer_id"]] += row["tokens"]


def test_echo_forwards_are_audited_like_generations(mesh):
    """An echo's prompt-only session is work like any other: petals opens its server sessions the same way, so the
    coordinator's audits can capture every step of them and recompute every position (here all are captured and
    audited with the audits' own rule and the coordinator's own reference blocks)."""
    from farworker.coordinator.services.audit import audit_session
    from farworker.coordinator.spot_check import SpotChecker, span_tolerance
    from farworker.session_capture import CaptureBudget, SessionCapture

    class EveryServerSession:
        """SessionAudits' interface to the mesh client, choosing every server session."""

        def __init__(self):
            self.captures: list = []

        def watch(self, peer_id, span, session_id):
            return SessionCapture(peer_id, tuple(span), session_id, CaptureBudget(1 << 30))

        def submit(self, captures):
            self.captures += captures

    audits, prompt = EveryServerSession(), [1, 5, 9, 200, 7, 64, 3]
    coordinator_mesh = mesh.coordinator.app.state.mesh
    served = coordinator_mesh.generate(prompt, 0, 0.0, echo=True, logprobs=0, audits=audits)
    for span in served.route:  # served outside the coordinator's API: the ledger test adds it by hand
        OTHER_COORDINATORS_ROUTES[span["peer_id"]] += span["tokens"]
    assert served.completion_ids == [] and len(served.prompt_logprobs) == len(prompt)
    assert sorted(tuple(c.span) for c in audits.captures) == [(0, 2), (2, 4)]
    checker = SpotChecker(coordinator_mesh)
    for capture in audits.captures:
        result = audit_session(capture, checker.reference_output,
                               span_tolerance("float32", "none", capture.span[1] - capture.span[0]))
        assert result.passed and result.positions == len(prompt), result


def test_a_bad_api_keys_file_is_one_line_naming_the_line(tmp_path):
    from farworker.coordinator.command import read_api_keys

    bad = tmp_path / "keys"
    bad.write_text("alice sk-alice-0123456789abcdef\nbob short\n")
    with pytest.raises(ValueError, match="line 2: expected 'NAME KEY'"):
        read_api_keys(bad)


LM_EVAL_TASK = "farworker_mc"
LM_EVAL_TASK_DIR = Path(__file__).resolve().parent / "eval_task"
# float32 on both sides; the mesh's blocks and the local model sum in other orders: ~1e-6 apart per token
LOGLIKELIHOOD_TOLERANCE = 1e-4


def lm_evaluate(model: str, model_args: str) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[LM_EVAL_TASK], batch_size=4,
                                   log_samples=True, bootstrap_iters=0)


def lm_eval_loglikelihoods(results: dict) -> dict[int, list[float]]:
    """Per item, each choice's log-likelihood (lm-eval's is_greedy aside: 0.4.1's local-completions gets it wrong
    for any server, comparing a token's text with a float)."""
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"][LM_EVAL_TASK]}


def test_lm_eval_local_completions_through_the_mesh_equals_its_hf_model(mesh, monkeypatch, tmp_path):
    """lm-evaluation-harness scores the mesh like the model itself: its `local-completions` model (echo + logprobs
    through /v1/completions, the `openai` client underneath) and its `hf` model (local transformers, float32) run the
    repository's small multiple-choice task (tests/eval_task/: a local jsonl, no hub download) on the tiny
    checkpoint, and get the same accuracy and the same log-likelihood for every choice."""
    monkeypatch.chdir(LM_EVAL_TASK_DIR)  # the data file and exact_match/ (tests/eval_task/exact_match/) are found here
    for name, value in lm_eval_offline.offline_environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # lm-eval's client reads it; this coordinator has no keys
    datasets_builder = pytest.importorskip("datasets.builder", reason="lm-eval is in requirements/eval.txt")
    monkeypatch.setattr(datasets_builder, "is_remote_filesystem", lm_eval_offline.is_remote_filesystem)
    from lm_eval.tasks import TASK_REGISTRY, include_path

    if LM_EVAL_TASK not in TASK_REGISTRY:  # once per process: lm-eval refuses a second registration
        include_path(str(LM_EVAL_TASK_DIR))
    started = time.monotonic()
    through_mesh = lm_evaluate("local-completions", f"model={TINY_MODEL_NAME},base_url={mesh.url}/v1,"
                                                 f"tokenizer_backend=huggingface,tokenizer={mesh.model}")
    mesh_s, started = time.monotonic() - started, time.monotonic()
    local = lm_evaluate("hf", f"pretrained={mesh.model},dtype=float32,device=cpu")
    local_s = time.monotonic() - started
    mesh_ll, local_ll = lm_eval_loglikelihoods(through_mesh), lm_eval_loglikelihoods(local)
    assert sorted(mesh_ll) == sorted(local_ll) == list(range(36))
    for doc, expected in local_ll.items():
        assert len(mesh_ll[doc]) == len(expected) == 4
        for got, want in zip(mesh_ll[doc], expected, strict=True):
            assert abs(got - want) <= LOGLIKELIHOOD_TOLERANCE, (doc, mesh_ll[doc], expected)
    assert through_mesh["results"][LM_EVAL_TASK]["acc,none"] == local["results"][LM_EVAL_TASK]["acc,none"]
    worst = max(abs(a - b) for doc in local_ll for a, b in zip(mesh_ll[doc], local_ll[doc], strict=True))
    print(f"\nlm-eval {LM_EVAL_TASK}: acc {through_mesh['results'][LM_EVAL_TASK]['acc,none']:.4f} local-completions "
          "through the mesh "
          f"({mesh_s:.1f} s), {local['results'][LM_EVAL_TASK]['acc,none']:.4f} hf ({local_s:.1f} s); "
          f"{sum(map(len, local_ll.values()))} log-likelihoods, largest difference {worst:.2e}; item 0: mesh "
          f"{mesh_ll[0]}, hf {local_ll[0]}")


def test_the_ledger_equals_every_route_including_streams_and_cancellations(mesh):
    routed = Counter(OTHER_COORDINATORS_ROUTES)
    for row in mesh.coordinator.store.completion_routes():
        routed[row["peer_id"]] += row["tokens"]
    wait_for(lambda: mesh.ledger() == dict(routed), 60, f"ledger == routes {dict(routed)} (now {mesh.ledger()})")
