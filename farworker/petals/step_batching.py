"""Cross-session step batching: concurrent inference steps of different sessions over the same blocks run as
one runtime call.

petals queues each session's step as its own task in the span's merged inference pool and the runtime runs
them one at a time (its PrioritizedTaskPool "does not combine incoming requests into batches"). On a GPU a
decode step is bound by reading the weights, so running 8 sessions' steps together costs little more than one.

`BatchingInferencePool` takes the pool's most urgent task as petals would, then takes along every waiting task
of the same priority that is compatible (same blocks, same step length, no deep prompts or adapters). The
runtime calls `StepBatcher` once for the group: the weight-bound parts (projections, MLP, norms) run over all
rows at once; attention reads each session's own KV cache, padded to the longest past and masked, with rotary
positions per session; each session's new keys/values go back into its own cache. The pool then hands each
task its rows. A lone task, or a span whose blocks we cannot batch, runs petals' own step unchanged.
"""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llama.modeling_llama import rotate_half

from farworker.petals.compat import import_petals, is_dummy_tensor

log = logging.getLogger(__name__)

# At most this many sessions' steps in one call, and at most this many tokens (rows x step length). 128 tokens
# is petals' own bound for a step it runs over several blocks at once (MAX_SHORT_INFERENCE_TOKENS).
MAX_SESSIONS_PER_CALL = 32
MAX_TOKENS_PER_CALL = 128
# Attention reads every row's past padded to the longest one: a call's padded keys+values of one block stay under
# petals' default max_chunk_size_bytes (256 MiB), the memory petals itself lets one inference chunk take.
MAX_PADDED_CACHE_BYTES = 256 * 2**20
RECEIPT_WAIT = 5.0  # seconds: a handler sends a task's pipe token right after queueing the task


@dataclass(frozen=True)
class CoBatch:
    """The inputs of several tasks (each a tuple of petals' merged-step args) run as one runtime call."""

    steps: tuple[tuple[Any, ...], ...]


def step_key(args: Sequence[Any]) -> tuple | None:
    """What a task must share with others to run in one call with them; None if it runs alone.

    args are petals' merged inference step's: (hidden_states, hypo_ids, inference_infos, *prompts)."""
    if len(args) < 3 or not isinstance(args[0], torch.Tensor):
        return None
    hidden_states, _hypo_ids, infos, *prompts = args
    if hidden_states.ndim != 3 or hidden_states.numel() == 0:
        return None
    if any(prompt is not None and prompt.numel() > 0 for prompt in prompts):
        return None  # deep prompts are added per session before each block: not batched
    if any(info.active_adapter for info in infos):
        return None
    return tuple(info.uid for info in infos), hidden_states.shape[1], hidden_states.shape[2], hidden_states.dtype


def step_tokens(args: Sequence[Any]) -> int:
    return args[0].shape[0] * args[0].shape[1]


def past_length(args: Sequence[Any]) -> int:
    """Tokens already in the session's cache (the same for every block of its step)."""
    return args[2][0].prefix_length


def can_batch_block(backend) -> bool:
    """The block is a single-device Llama layer whose parts we can call one by one."""
    shards = getattr(backend.module, "module_shards", None)
    if not shards or len(shards) != 1:
        return False
    layer = shards[0]
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb", "num_key_value_groups")
    return (
        attn is not None
        and all(hasattr(attn, name) for name in needed)
        and getattr(attn.config, "pretraining_tp", 1) == 1
        # dynamic NTK scaling derives the rotary table from the call's length: a padded call would change it
        and (getattr(attn.config, "rope_scaling", None) or {}).get("type", "linear") == "linear"
        and all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp"))
    )


def batched_llama_step(layer, hidden_states: torch.Tensor, pasts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       row_counts: Sequence[int], past_lengths: Sequence[int]) -> torch.Tensor:
    """One Llama decoder layer over several sessions' rows; each session's cache is read and extended in place.

    hidden_states: [rows, t, hidden] (the sessions' rows one after another); pasts: each session's petals cache
    (keys [b, kv_heads, head_dim, max_len], values [b, kv_heads, max_len, head_dim]); row_counts: b per session;
    past_lengths: tokens already in each session's cache. Returns the layer's output [rows, t, hidden]."""
    attn = layer.self_attn
    rows, step, _ = hidden_states.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    device = hidden_states.device
    row_lengths = torch.tensor(
        [length for length, count in zip(past_lengths, row_counts, strict=True) for _ in range(count)], device=device
    )
    longest = max(past_lengths)

    residual = hidden_states
    normed = layer.input_layernorm(hidden_states)
    query = attn.q_proj(normed).view(rows, step, heads, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(rows, step, kv_heads, head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(rows, step, kv_heads, head_dim).transpose(1, 2)

    # each row's new tokens sit at its own positions: its past length onwards
    positions = row_lengths[:, None] + torch.arange(step, device=device)[None, :]
    cos, sin = attn.rotary_emb(value, seq_len=longest + step)
    cos, sin = cos[0, 0][positions].unsqueeze(1), sin[0, 0][positions].unsqueeze(1)  # [rows, 1, step, head_dim]
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin

    # Keys/values: each row's past (zero-padded up to the longest past), then the step's new tokens.
    keys = key.new_zeros(rows, kv_heads, longest + step, head_dim)
    values = value.new_zeros(rows, kv_heads, longest + step, head_dim)
    starts = list(itertools.accumulate(row_counts, initial=0))
    for (cache_keys, cache_values), start, count, length in zip(pasts, starts, row_counts, past_lengths, strict=False):
        if length:
            keys[start:start + count, :, :length] = cache_keys[:, :, :, :length].transpose(2, 3)
            values[start:start + count, :, :length] = cache_values[:, :, :length]
    keys[:, :, longest:] = key
    values[:, :, longest:] = value

    # A row sees its own past (not the padding after it) and the step's tokens up to its own (causal).
    columns = torch.arange(longest + step, device=device)
    sees_past = columns[None, None, :] < row_lengths[:, None, None]  # [rows, 1, cols]
    new_index = columns - longest  # index among the step's tokens (negative for past columns)
    sees_new = (new_index[None, :] >= 0) & (new_index[None, :] <= torch.arange(step, device=device)[:, None])
    allowed = sees_past | sees_new[None]  # [rows, step, cols]
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)

    groups = attn.num_key_value_groups
    keys_all = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    values_all = values.repeat_interleave(groups, dim=1) if groups > 1 else values
    attended = torch.nn.functional.scaled_dot_product_attention(query, keys_all, values_all, attn_mask=mask[:, None])
    attended = attended.transpose(1, 2).reshape(rows, step, heads * head_dim)
    hidden_states = residual + attn.o_proj(attended)
    hidden_states = hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))

    for (cache_keys, cache_values), start, count, length in zip(pasts, starts, row_counts, past_lengths, strict=False):
        cache_keys[:, :, :, length:length + step] = key[start:start + count].transpose(2, 3)
        cache_values[:, :, length:length + step] = value[start:start + count]
    return hidden_states


class StepBatcher:
    """The merged pool's process function: a CoBatch runs batched, anything else runs petals' merged step."""

    def __init__(self, backends: dict, merged_step):
        self.backends = backends
        self.merged_step = merged_step
        self.batches = False  # set once the blocks are known to be batchable (can_batch_block)
        self.cache_bytes_per_token = 0  # one block's keys+values per token and row (set with batches)
        self.largest = 1  # the most sessions run in one call so far (logged when it grows)

    def __call__(self, *args):
        if args and isinstance(args[0], CoBatch):
            return self.run_batch(args[0].steps)
        return self.merged_step(*args)

    @torch.inference_mode()
    def run_batch(self, steps: Sequence[tuple[Any, ...]]) -> tuple[torch.Tensor]:
        dtype = self.backends[steps[0][2][0].uid].dtype
        hidden_states = torch.cat([step[0].to(dtype) for step in steps], dim=0)
        row_counts = [step[0].shape[0] for step in steps]
        for block in range(len(steps[0][2])):
            infos = [step[2][block] for step in steps]
            backend = self.backends[infos[0].uid]
            handles = [handle for info in infos for handle in info.cache_handles]
            with backend.memory_cache.use_cache(*handles) as caches:
                pasts = [tuple(caches[2 * i:2 * i + 2]) for i in range(len(steps))]
                for hypo_ids, past in zip((step[1] for step in steps), pasts, strict=True):
                    if not is_dummy_tensor(hypo_ids):  # beam search reorders the session's cache, as petals does
                        backend._reorder_cache_inplace(past, hypo_ids)
                hidden_states = batched_llama_step(
                    backend.module.module_shards[0], hidden_states, pasts, row_counts,
                    [info.prefix_length for info in infos],
                )
        if len(steps) > self.largest:
            self.largest = len(steps)
            log.info("Step batching: ran %d sessions' steps in one call (the most so far)", len(steps))
        return (hidden_states,)


def batching_pool_class():
    """BatchingInferencePool, built on petals' PrioritizedTaskPool (imported through the compat layer)."""
    import_petals()
    from petals.server import task_pool

    class BatchingInferencePool(task_pool.PrioritizedTaskPool):
        """petals' pool, except that a load takes along waiting compatible tasks of the same priority."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._members: dict[int, list[tuple[int, int, int]]] = {}  # batch uid -> (task uid, first row, end)

        def load_batch_to_runtime(self, timeout=None, device=None):
            device = device if device is not None else self.device
            first = self._ordered_tasks.get(block=True, timeout=timeout)
            self.batch_receiver.recv()  # one pipe token per task, as petals counts them
            tasks = [first, *self._take_companions(first)]
            for task in tasks:
                self._dispatched_tasks[task.uid] = task
            if not self._ordered_tasks.empty():
                remaining = self._ordered_tasks.queue[0]
                self.priority = (remaining.priority, remaining.time_submitted)

            def move(args):
                return tuple(task_pool._move_to_device_if_tensor(arg, device, share_memory=False) for arg in args)

            if len(tasks) == 1:
                return first.uid, list(move(first.args))
            members, row = [], 0
            for task in tasks:
                rows = task.args[0].shape[0]
                members.append((task.uid, row, row + rows))
                row += rows
            self._members[first.uid] = members
            return first.uid, [CoBatch(tuple(move(task.args) for task in tasks))]

        def _take_companions(self, first) -> list:
            key = step_key(first.args)
            if key is None or not getattr(self.process_func, "batches", False):
                return []
            companions, others, tokens = [], [], step_tokens(first.args)
            rows, longest = first.args[0].shape[0], past_length(first.args)
            while True:
                try:
                    task = self._ordered_tasks.get_nowait()
                except queue.Empty:
                    break
                padded = (rows + task.args[0].shape[0]) * (max(longest, past_length(task.args)) + key[1])
                fits = (len(companions) + 1 < MAX_SESSIONS_PER_CALL
                        and tokens + step_tokens(task.args) <= min(MAX_TOKENS_PER_CALL, self.max_batch_size)
                        and padded * self.process_func.cache_bytes_per_token <= MAX_PADDED_CACHE_BYTES)
                if fits and task.priority == first.priority and step_key(task.args) == key:
                    companions.append(task)
                    tokens += step_tokens(task.args)
                    rows, longest = rows + task.args[0].shape[0], max(longest, past_length(task.args))
                else:
                    others.append(task)
            for task in others:
                self._ordered_tasks.put(task)
            for _ in companions:
                if self.batch_receiver.poll(RECEIPT_WAIT):
                    self.batch_receiver.recv()
            return companions

        def send_outputs_from_runtime(self, uid: int, batch_outputs):
            members = self._members.pop(uid, None)
            if members is None:
                return super().send_outputs_from_runtime(uid, batch_outputs)
            (hidden_states,) = batch_outputs
            for task_uid, start, end in members:
                super().send_outputs_from_runtime(task_uid, [hidden_states[start:end].clone()])

        def send_exception_from_runtime(self, uid: int, exception: BaseException):
            members = self._members.pop(uid, None)
            for task_uid in [member[0] for member in members] if members else [uid]:
                super().send_exception_from_runtime(task_uid, exception)

    return BatchingInferencePool


def merge_inference_pools_with_batching(backends: dict) -> None:
    """Stand-in for petals' merge_inference_pools_inplace: the span's one inference pool, batching when it can."""
    from petals.server.backend import _MergedInferenceStep

    first_pool = next(iter(backends.values())).inference_pool
    batcher = StepBatcher(backends, _MergedInferenceStep(backends))
    batcher.batches = all(can_batch_block(backend) for backend in backends.values())
    batcher.cache_bytes_per_token = max(sum(b.cache_bytes_per_token.values()) for b in backends.values())
    if not batcher.batches:
        log.info("Step batching is off for these blocks: not single-device Llama layers")
    merged_pool = batching_pool_class()(
        batcher, max_batch_size=first_pool.max_batch_size, device=first_pool.device, name="merged_inference"
    )
    for backend in backends.values():
        assert not backend.inference_pool.is_alive()
        backend.inference_pool = merged_pool


def install() -> None:
    """Make petals build each span's merged inference pool as this module's pool, which runs the concurrent steps
    of different sessions as one call. Takes effect for servers built after this call.

    petals' ModuleContainer calls ``merge_inference_pools_inplace`` by the name it imported into
    petals.server.server; that is the name replaced."""
    import_petals()
    import petals.server.server as server_module

    server_module.merge_inference_pools_inplace = merge_inference_pools_with_batching
