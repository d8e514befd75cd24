"""Cross-session step batching (farworker/petals/step_batching.py): sessions at different positions run as one call
and each gets exactly what it would get alone.

Two levels: petals' own Llama block against the batched step, session by session (fast, exact to float
rounding); and a real `farworker run` worker serving concurrent sessions of petals' own client that join and
leave mid-generation, each compared with local transformers."""

from __future__ import annotations

import pytest
import torch

from farworker.config import ConfigError, load_config
from farworker.petals.compat import import_petals
from farworker.petals.step_batching import batched_llama_step

HIDDEN, HEADS, KV_HEADS, MAX_LENGTH = 64, 4, 2, 48
HEAD_DIM = HIDDEN // HEADS


def llama_block(seed: int = 0):
    import_petals()
    from petals.models.llama.block import WrappedLlamaBlock
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, num_hidden_layers=1)
    return WrappedLlamaBlock(config).eval()


def empty_cache(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A session's cache in petals' layout (TransformerBackend.get_inference_cache_descriptors)."""
    return torch.zeros(rows, KV_HEADS, HEAD_DIM, MAX_LENGTH), torch.zeros(rows, KV_HEADS, MAX_LENGTH, HEAD_DIM)


def petals_step(block, cache, hidden, past_length: int) -> torch.Tensor:
    """One session's step the way petals' TransformerBackend.inference_step runs it (its cache layout)."""
    keys, values = cache
    rows = hidden.shape[0]
    layer_past = (keys.flatten(0, 1)[:, :, :past_length], values.flatten(0, 1)[:, :past_length])
    output, (new_keys, new_values) = block(hidden, layer_past=layer_past, use_cache=True)
    length = new_keys.shape[-1]
    keys[:, :, :, past_length:length] = new_keys.view(rows, KV_HEADS, HEAD_DIM, length)[:, :, :, past_length:]
    values[:, :, past_length:length] = new_values.view(rows, KV_HEADS, length, HEAD_DIM)[:, :, past_length:]
    return output


@pytest.mark.parametrize("step_length", [1, 3])
def test_batched_step_equals_each_session_alone(step_length):
    """Sessions with different prompt lengths (so different positions) and row counts, stepped together."""
    block = llama_block()
    prompt_lengths, row_counts = [5, 1, 13, 9], [1, 2, 1, 1]
    alone = [empty_cache(rows) for rows in row_counts]
    together = [empty_cache(rows) for rows in row_counts]
    with torch.inference_mode():
        for session, (length, rows) in enumerate(zip(prompt_lengths, row_counts, strict=True)):
            prompt = torch.randn(rows, length, HIDDEN)
            petals_step(block, alone[session], prompt, 0)
            petals_step(block, together[session], prompt, 0)
        lengths = list(prompt_lengths)
        for _ in range(4):
            steps = [torch.randn(rows, step_length, HIDDEN) for rows in row_counts]
            expected = torch.cat([petals_step(block, cache, hidden, length)
                                  for cache, hidden, length in zip(alone, steps, lengths, strict=True)])
            batched = batched_llama_step(block, torch.cat(steps), together, row_counts, lengths)
            torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
            lengths = [length + step_length for length in lengths]
    for (keys_alone, values_alone), (keys_together, values_together) in zip(alone, together, strict=True):
        torch.testing.assert_close(keys_together, keys_alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values_together, values_alone, rtol=1e-5, atol=1e-5)


def test_padding_after_a_short_past_is_not_attended():
    """A session with a short past beside a long one: garbage in its cache beyond its past must not count
    (that is what the mask is for; its cache is reused memory in real servers)."""
    block = llama_block(seed=1)
    short, long = empty_cache(1), empty_cache(1)
    with torch.inference_mode():
        petals_step(block, short, torch.randn(1, 2, HIDDEN), 0)
        petals_step(block, long, torch.randn(1, 20, HIDDEN), 0)
        clean = (short[0].clone(), short[1].clone())
        short[0][:, :, :, 2:], short[1][:, :, 2:] = 1e4, -1e4  # beyond its 2 tokens: left-over garbage
        step = torch.randn(2, 1, HIDDEN)
        expected = petals_step(block, clean, step[:1], 2)
        batched = batched_llama_step(block, step, [short, long], [1, 1], [2, 20])
    torch.testing.assert_close(batched[:1], expected, rtol=1e-5, atol=1e-5)


def test_switch_parses_and_bad_value_names_the_setting(tmp_path):
    base = {"FARLABS_WALLET_ADDRESS": "0x" + "1" * 40, "FARLABS_NEW_SWARM": "true",
            "FARLABS_API_BASE_URL": "http://127.0.0.1:9", "FARLABS_STATE_DIR": str(tmp_path),
            "FARLABS_CACHE_DIR": str(tmp_path)}
    assert load_config(base).step_batching is True
    assert load_config({**base, "FARLABS_STEP_BATCHING": "false"}).step_batching is False
    with pytest.raises(ConfigError) as error:
        load_config({**base, "FARLABS_STEP_BATCHING": "sometimes"})
    assert "FARLABS_STEP_BATCHING='sometimes' is invalid: expected true or false" in str(error.value)


SHARP_SEED, SHARP_INIT = 12, 0.15
# (prompt length, new tokens, round it joins in): sessions at different positions join and leave mid-generation
SESSIONS = [(3, 30, 0), (11, 20, 3), (6, 24, 6), (17, 12, 10)]


@pytest.fixture(scope="module")
def sharp_model():
    """The tiny model's shape with larger weights (built once, deterministically): its attention is peaked, so
    its greedy tokens depend on positions and on which past tokens are attended. The tiny model's near-uniform
    attention hides both: with every session's positions wrong its tokens still matched transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from farworker.local_mesh import shared_cache_dir
    from farworker.tiny_model import TINY_CONFIG, ensure_tiny_tokenizer

    directory = shared_cache_dir() / f"sharp-llama-{SHARP_SEED}"
    if not (directory / "tokenizer.json").is_file():
        torch.manual_seed(SHARP_SEED)
        model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG, initializer_range=SHARP_INIT, torch_dtype="float32"))
        model.save_pretrained(directory, safe_serialization=True)
        ensure_tiny_tokenizer(directory)  # written last: its presence means the checkpoint is complete
    return directory


class GreedySession:
    """One petals inference session of the client, generating greedily one step at a time."""

    def __init__(self, model, prompt: list[int], new_tokens: int):
        from petals.client.inference_session import InferenceSession

        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        # petals' session object itself: model.inference_session() would bind it to the opening thread's context
        self.opened = InferenceSession(model.transformer.h.sequence_manager, max_length=len(prompt) + new_tokens)
        self.session = None
        self.tokens: list[int] = []

    @property
    def done(self) -> bool:
        return len(self.tokens) == self.new_tokens

    def step(self) -> None:
        embed = self.model.get_input_embeddings()
        with torch.inference_mode():
            if self.session is None:
                self.session = self.opened.__enter__()
                hidden = self.session.step(embed(torch.tensor([self.prompt])))
            else:
                hidden = self.session.step(embed(torch.tensor([self.tokens[-1:]])))
            logits = self.model.lm_head(self.model.model.norm(hidden[:, -1:]))
        self.tokens.append(int(logits.argmax(-1)))
        if self.done:
            self.close()

    def close(self) -> None:
        if self.session is not None:
            self.session = None
            self.opened.close()


def test_concurrent_sessions_joining_and_leaving_match_transformers(start_workers, sharp_model):
    """Rounds in which every active session sends its next step at the same moment (so the worker gets them
    together); sessions join in later rounds and leave when done. Each must get transformers' greedy tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.local_reference import generate_locally

    worker = start_workers("batching", "0:4", env={
        "FARLABS_STEP_BATCHING": "true", "FARLABS_MODEL_NAME": str(sharp_model), "FARLABS_ALLOW_LOCAL_MODEL": "true"})
    client = MeshClient(sharp_model, worker.wait_online()["maddrs"], sharp_model.name)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 250, (length,), generator=generator).tolist() for length, _, _ in SESSIONS]
    sessions: list[GreedySession] = []
    try:
        client.warm()
        with ThreadPoolExecutor(len(SESSIONS)) as pool:
            for round_index in range(100):
                for (_, new_tokens, joins), prompt in zip(SESSIONS, prompts, strict=True):
                    if joins == round_index:
                        sessions.append(GreedySession(client._model, prompt, new_tokens))
                active = [session for session in sessions if not session.done]
                if not active and len(sessions) == len(SESSIONS):
                    break
                for future in [pool.submit(session.step) for session in active]:
                    future.result(timeout=60)
    finally:
        for session in sessions:
            session.close()
        client.close()
    log = worker.proc.log_tail(400)
    assert "Step batching: ran 3 sessions' steps in one call" in log, "no 3 steps were batched:\n" + log[-3000:]
    for index, (session, prompt) in enumerate(zip(sessions, prompts, strict=True)):
        assert session.tokens == generate_locally(str(sharp_model), prompt, session.new_tokens), f"session {index}"


def test_pool_co_batches_compatible_steps_of_equal_priority_and_scatters_results():
    """The pool takes the most urgent step, co-batches the waiting compatible ones of the same priority, leaves
    the rest queued in order, and gives each session back exactly its own rows."""
    import_petals()
    from petals.data_structures import InferenceMetadata

    from farworker.petals.step_batching import CoBatch, StepBatcher, batching_pool_class

    batcher = StepBatcher({}, merged_step=None)
    batcher.batches, batcher.cache_bytes_per_token = True, 1024
    pool = batching_pool_class()(batcher, max_batch_size=2048, name="test_inference")

    def step(uids, rows, priority, prompts=None):
        infos = tuple(InferenceMetadata(uid, 5, (0, 1), None) for uid in uids)
        hidden = torch.full((rows, 1, 8), float(len(pool._ordered_tasks.queue)))
        future = pool.submit_task(hidden, torch.empty(0, dtype=torch.int64), infos,
                                  *(prompts or [None] * len(uids)), priority=priority)
        pool._ordered_tasks.put(pool.submitted_tasks.get())  # what the pool's prioritizer thread does
        return future

    span, other_span = ("m.0", "m.1"), ("m.2",)
    first = step(span, 1, 0.0)
    two_rows = step(span, 2, 0.0)
    elsewhere = step(other_span, 1, 0.0)  # other blocks: not compatible
    with_prompt = step(span, 1, 0.0, prompts=[torch.ones(1, 1, 8), None])  # deep prompts: runs alone
    less_urgent = step(span, 1, 1.0)  # same blocks, lower priority: not taken along
    last = step(span, 1, 0.0)

    uid, (batch,) = pool.load_batch_to_runtime()
    assert isinstance(batch, CoBatch)
    assert [len(args[0]) for args in batch.steps] == [1, 2, 1]  # first, two_rows, last
    assert [task.priority for task in pool._ordered_tasks.queue] == [0.0, 0.0, 1.0]
    assert pool.batch_receiver.poll() and not pool.empty  # three pipe tokens left for the three queued tasks

    # The queue handed the pool a pickled copy of each task (a handler process would be another process): the
    # results land on the pool's copies of the futures.
    dispatched = {task_uid: task.future for task_uid, task in pool._dispatched_tasks.items()}
    assert set(dispatched) == {first._uid, two_rows._uid, last._uid}
    rows = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, 1, 8).contiguous()
    pool.send_outputs_from_runtime(uid, [rows])
    assert dispatched[first._uid].result(timeout=5)[0][:, 0, 0].tolist() == [0.0]
    assert dispatched[two_rows._uid].result(timeout=5)[0][:, 0, 0].tolist() == [1.0, 2.0]
    assert dispatched[last._uid].result(timeout=5)[0][:, 0, 0].tolist() == [3.0]
    assert not pool._dispatched_tasks
    alone = [pool.load_batch_to_runtime()[0] for _ in range(3)]  # each runs alone, in priority order
    assert alone == [elsewhere._uid, with_prompt._uid, less_urgent._uid]
    assert pool.empty


def test_pool_does_not_co_batch_past_the_padded_cache_budget():
    """Rows x (longest past + step) x cache bytes per token is the padded keys/values a call allocates per block:
    steps that would take it over MAX_PADDED_CACHE_BYTES run apart."""
    import_petals()
    from petals.data_structures import InferenceMetadata

    from farworker.petals.step_batching import MAX_PADDED_CACHE_BYTES, CoBatch, StepBatcher, batching_pool_class

    batcher = StepBatcher({}, merged_step=None)
    # two single-row steps at past 5, step 1: 2 x 6 padded tokens; allow 11 of them, not 12
    batcher.batches, batcher.cache_bytes_per_token = True, MAX_PADDED_CACHE_BYTES // 11
    pool = batching_pool_class()(batcher, max_batch_size=2048, name="test_inference")
    for _ in range(2):
        infos = (InferenceMetadata("m.0", 5, (0, 1), None),)
        pool.submit_task(torch.zeros(1, 1, 8), torch.empty(0, dtype=torch.int64), infos, None, priority=0.0)
        pool._ordered_tasks.put(pool.submitted_tasks.get())
    _, args = pool.load_batch_to_runtime()
    assert not isinstance(args[0], CoBatch) and len(pool._ordered_tasks.queue) == 1
    batcher.cache_bytes_per_token = MAX_PADDED_CACHE_BYTES // 12  # now 2 x 6 tokens fit
    infos = (InferenceMetadata("m.0", 5, (2, 3), None),)
    pool.submit_task(torch.zeros(1, 1, 8), torch.empty(0, dtype=torch.int64), infos, None, priority=0.0)
    pool._ordered_tasks.put(pool.submitted_tasks.get())
    _, (batch,) = pool.load_batch_to_runtime()
    assert isinstance(batch, CoBatch) and len(batch.steps) == 2
