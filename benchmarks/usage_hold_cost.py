"""Benchmark 1c: what holding an open session's usage on disk costs per step (farworker/outbox.py hold_open).

Since the kill -9 fix, the handler that answered an inference step rewrites its session's running segment in
the outbox (SQLite WAL, synchronous=NORMAL) before it reads the next step. This measures that write against
the cheapest step there is: a one-token decode step of the embedded tiny Llama (4 blocks, hidden 128,
float32), computed locally with its KV cache and no network at all. Rounds interleave the two (a block of
holds, then a block of steps), medians of the per-round means; the ratio is an upper bound on the share of
a served step (a step through the mesh also pays p2pd, the handler and the client: ~10 ms here).

    python benchmarks/usage_hold_cost.py --rounds 7 --n 300 --out benchmarks/results/usage_hold_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import benchlib as bl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=300, help="holds and steps per round (bounded)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from farworker.outbox import Outbox, make_record
    from farworker.threading_policy import apply_thread_policy

    apply_thread_policy("single")  # the worker's default policy on CPU (a step uses one thread)
    model = AutoModelForCausalLM.from_pretrained(str(bl.tiny_model_dir()), torch_dtype=torch.float32).eval()
    prompt = torch.tensor([bl.PROMPT_IDS])
    with tempfile.TemporaryDirectory(prefix="fw-bench-hold-") as work:
        outbox = Outbox(Path(work) / "outbox.sqlite3")
        segment = make_record("bench", (0, 4), 0, 0, time.time())
        hold_us, step_us = [], []
        with torch.inference_mode():
            for _ in range(args.rounds):
                started = time.perf_counter()
                for step in range(args.n):
                    segment.update(tokens=step + 1, steps=step + 1, ended_at=time.time())
                    outbox.hold_open(segment)
                hold_us.append((time.perf_counter() - started) / args.n * 1e6)

                out = model(prompt, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                length = prompt.shape[1]
                started = time.perf_counter()
                for _ in range(args.n):
                    if length >= model.config.max_position_embeddings - 1:  # start over (counted: rare)
                        out = model(prompt, use_cache=True)
                        cache, token, length = out.past_key_values, out.logits[:, -1:].argmax(-1), prompt.shape[1]
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache, token, length = out.past_key_values, out.logits[:, -1:].argmax(-1), length + 1
                step_us.append((time.perf_counter() - started) / args.n * 1e6)
        held = outbox.open_segments()
        outbox.close()

    hold, step = statistics.median(hold_us), statistics.median(step_us)
    result = {
        "benchmark": "usage_hold_cost",
        "machine": bl.machine_info(),
        "rounds": args.rounds,
        "n": args.n,
        "hold_open_us": [round(v, 1) for v in hold_us],
        "tiny_local_step_us": [round(v, 1) for v in step_us],
        "median_hold_open_us": round(hold, 1),
        "median_tiny_local_step_us": round(step, 1),
        "hold_share_of_tiny_local_step": round(hold / step, 4),
        "last_segment_held": held[-1]["steps"] if held else None,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
