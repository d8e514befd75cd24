"""Benchmark 10b: one decode step of B sessions over real petals Llama blocks, batched
(farworker/petals/step_batching.py) against one session at a time (petals' own path), at B = 1, 8, 32.

Blocks come from a checkpoint directory through petals' own loader (load_pretrained_block), on the device given.
Sessions sit at different positions (past lengths spread over 64..--past), each with its own cache in petals'
layout. Per B: the seconds for one step of every session, both ways (median over --steps), tokens/s per block
and the ratio; and the largest difference between the two outputs (they must agree to the dtype's rounding).
benchmarks/gpu_run.py runs it on the Llama-2-7B-shaped checkpoint (step "batch_sizes"); alone:

    python benchmarks/batch_step_speed.py --model DIR --device cuda --dtype float16 --out batch_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import benchlib as bl


def petals_step(block, cache, hidden, past_length: int):
    """One session's step as petals' TransformerBackend.inference_step runs it (its cache layout and copies)."""
    keys, values = cache
    rows, kv_heads, head_dim = keys.shape[0], keys.shape[1], keys.shape[2]
    layer_past = (keys.flatten(0, 1)[:, :, :past_length], values.flatten(0, 1)[:, :past_length])
    output, (new_keys, new_values) = block(hidden, layer_past=layer_past, use_cache=True)
    length = new_keys.shape[-1]
    keys[:, :, :, past_length:length] = new_keys.view(rows, kv_heads, head_dim, length)[:, :, :, past_length:]
    values[:, :, past_length:length] = new_values.view(rows, kv_heads, length, head_dim)[:, :, past_length:]
    return output


def measure(model_dir: str, device: str, dtype_name: str, batch_sizes=(1, 8, 32), num_blocks: int = 4,
            past: int = 512, steps: int = 10) -> dict:
    import torch

    from farworker.petals.compat import import_petals
    from farworker.petals.step_batching import batched_llama_step

    import_petals()
    from petals.server.from_pretrained import load_pretrained_block
    from petals.utils.auto_config import AutoDistributedConfig

    dtype = getattr(torch, dtype_name)
    config = AutoDistributedConfig.from_pretrained(model_dir)
    blocks = [load_pretrained_block(model_dir, i, config=config, torch_dtype=dtype).to(device).eval()
              for i in range(min(num_blocks, config.num_hidden_layers))]
    hidden_size, heads = config.hidden_size, config.num_attention_heads
    kv_heads, head_dim = config.num_key_value_heads, hidden_size // heads
    max_length = past + steps + 2
    generator = torch.Generator(device="cpu").manual_seed(10)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def fresh_caches(count: int, lengths: list[int]):
        caches = []
        for _ in blocks:
            per_session = []
            for length in lengths[:count]:
                keys = torch.zeros(1, kv_heads, head_dim, max_length, dtype=dtype, device=device)
                values = torch.zeros(1, kv_heads, max_length, head_dim, dtype=dtype, device=device)
                keys[..., :length] = torch.randn(keys[..., :length].shape, generator=generator).to(device, dtype)
                values[:, :, :length] = torch.randn(values[:, :, :length].shape, generator=generator).to(device, dtype)
                per_session.append((keys, values))
            caches.append(per_session)
        return caches

    out: dict = {"blocks": len(blocks), "dtype": dtype_name, "device": device, "past_max": past, "by_batch": {}}
    with torch.inference_mode():
        for size in batch_sizes:
            lengths = [64 + (past - 64) * i // max(1, size - 1) for i in range(size)] if size > 1 else [past]
            alone, together = fresh_caches(size, lengths), None
            together = [[(k.clone(), v.clone()) for k, v in per_session] for per_session in alone]
            timings = {"alone": [], "batched": []}
            worst = 0.0
            for step in range(steps + 1):  # the first step warms up (kernels, allocator) and is not timed
                inputs = torch.randn(size, 1, hidden_size, generator=generator).to(device, dtype)
                positions = [length + step for length in lengths]
                sync()
                began = time.perf_counter()
                expected = []
                for session in range(size):
                    hidden = inputs[session:session + 1]
                    for block, caches in zip(blocks, alone, strict=True):
                        hidden = petals_step(block, caches[session], hidden, positions[session])
                    expected.append(hidden)
                sync()
                middle = time.perf_counter()
                hidden = inputs
                for block, caches in zip(blocks, together, strict=True):
                    hidden = batched_llama_step(block, hidden, caches, [1] * size, positions)
                sync()
                ended = time.perf_counter()
                if step:
                    timings["alone"].append(middle - began)
                    timings["batched"].append(ended - middle)
                worst = max(worst, float((torch.cat(expected) - hidden).abs().max()))
            alone_s, batched_s = statistics.median(timings["alone"]), statistics.median(timings["batched"])
            out["by_batch"][str(size)] = {
                "one_at_a_time_ms": round(1000 * alone_s, 3),
                "batched_ms": round(1000 * batched_s, 3),
                "one_at_a_time_tokens_per_s": round(size / alone_s, 1),
                "batched_tokens_per_s": round(size / batched_s, 1),
                "batched_over_one_at_a_time": round(alone_s / batched_s, 2),
                "max_abs_difference": worst,
            }
    if "1" in out["by_batch"]:
        single = out["by_batch"]["1"]["one_at_a_time_tokens_per_s"]
        for row in out["by_batch"].values():
            row["batched_over_batch_1"] = round(row["batched_tokens_per_s"] / single, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = measure(args.model or str(bl.tiny_model_dir()), args.device, args.dtype,
                     [int(b) for b in args.batch_sizes.split(",")], args.blocks, args.past, args.steps)
    result["machine"] = bl.machine_info()
    print(json.dumps(result["by_batch"], indent=1))
    bl.write_json(args.out, result)


if __name__ == "__main__":
    main()
