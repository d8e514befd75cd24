"""The benchmarks' client, in a process of its own.

Mesh mode (default): a petals client for one server; reads one JSON request a line on stdin
({"prompt": [ids], "new_tokens": N}), greedy-generates through the mesh, answers one JSON line
({"seconds": s, "tokens": [ids]}). The first line it prints is {"ready": true}.

Local mode (--local): plain transformers greedy generation on the same checkpoint, one warm-up then
--reps timed runs; prints one JSON line.

--policy sets the OpenMP policy before torch loads: "passive"/"single" as farworker applies them,
"default" leaves torch's own (what a plain petals client gets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--peer", default="")
    parser.add_argument("--dht-prefix", default="farworker-tiny-llama")
    parser.add_argument("--policy", choices=("passive", "single", "default"), default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.policy != "default":
        from farworker.threading_policy import apply_thread_policy

        apply_thread_policy(args.policy)
    if args.local:
        local(args)
    else:
        mesh(args)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def local(args) -> None:
    import torch
    from benchlib import PROMPT_IDS
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).eval().to(args.device)
    prompt = torch.tensor([PROMPT_IDS], device=args.device)
    seconds, tokens = [], None
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # rep 0 warms up
            _sync(args.device)
            begin = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            _sync(args.device)
            if rep:
                seconds.append(time.perf_counter() - begin)
            tokens = out[0, len(PROMPT_IDS) :].tolist()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tokens": tokens,
                "omp": os.environ.get("OMP_WAIT_POLICY"),
                "torch_threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def mesh(args) -> None:
    from farworker.petals.compat import import_petals

    petals = import_petals()
    import torch

    dtype = getattr(torch, args.dtype)
    model = petals.AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=[args.peer], dht_prefix=args.dht_prefix, torch_dtype=dtype
    )
    if args.device != "cpu":
        model = model.to(args.device)
    print(json.dumps({"ready": True, "torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        prompt = torch.tensor([request["prompt"]], device=args.device)
        _sync(args.device)
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=request["new_tokens"], do_sample=False)
        _sync(args.device)
        seconds = time.perf_counter() - begin
        print(json.dumps({"seconds": seconds, "tokens": out[0, prompt.shape[1] :].tolist()}), flush=True)
    model.transformer.h.sequence_manager.shutdown()


if __name__ == "__main__":
    main()
