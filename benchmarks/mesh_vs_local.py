"""Benchmark 2: tokens/s through the mesh (one `farworker run` holding all blocks, client in its own
process) against local transformers greedy generation on the same checkpoint.

Rounds alternate mesh, local, local, mesh, ...; during a local phase nothing of ours is running (server,
client and coordinator are stopped first) and local generation runs in a fresh process with torch's
default threads (the fastest setting for a lone process on a quiet machine) and, by default, also with
OMP_NUM_THREADS=1 (faster when other work shares the cores); the faster one is the baseline.
Reported: median tokens/s of each, and the mesh's overhead per token = 1000/mesh_tps - 1000/local_tps
(ms). Also checks that the tokens are equal.

    python benchmarks/mesh_vs_local.py --rounds 3 --reps 5 --new-tokens 64 --out benchmarks/results/mesh_vs_local.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import benchlib as bl


def mesh_phase(work: Path, model: Path, index: int, reps: int, new_tokens: int) -> tuple[list[float], list[int]]:
    server = client = None
    try:
        with bl.coordinator(work) as coord:
            server = bl.start_farworker(work, f"farworker-{index}", coord.url)
            server.wait_ready()
            client = bl.MeshClientProcess(work, f"client-{index}", server.initial_peer, model, "passive")
            client.generate(bl.PROMPT_IDS, new_tokens)  # warm-up
            answers = [client.generate(bl.PROMPT_IDS, new_tokens) for _ in range(reps)]
            return [a["seconds"] for a in answers], answers[-1]["tokens"]
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5, help="timed generations per phase")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--local-policies",
        default="default,single",
        help="comma list of default, passive, single; the fastest is the local baseline",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-bench-local-"))
    work.mkdir(parents=True, exist_ok=True)
    policies = [p.strip() for p in args.local_policies.split(",") if p.strip()]
    seconds = {"mesh": [], **{f"local-{p}": [] for p in policies}}
    tokens = {}
    try:
        for i in range(args.rounds):
            for phase in ["mesh", "local"] if i % 2 == 0 else ["local", "mesh"]:
                if phase == "mesh":
                    times, tokens["mesh"] = mesh_phase(work, model, i, args.reps, args.new_tokens)
                    seconds["mesh"] += times
                    bl.log(f"round {i} mesh: median {bl.median(times):.3f} s for {args.new_tokens} tokens")
                    continue
                for policy in policies:
                    out = bl.run_local(model, policy, args.new_tokens, args.reps)
                    seconds[f"local-{policy}"] += out["seconds"]
                    tokens["local"] = out["tokens"]
                    bl.log(f"round {i} local {policy}: median {bl.median(out['seconds']):.3f} s")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    tps = {k: args.new_tokens / bl.median(v) for k, v in seconds.items()}
    best = max((k for k in tps if k.startswith("local-")), key=tps.get)
    tps["local"] = tps[best]
    ms = {k: 1000 / v for k, v in tps.items()}
    bl.write_json(
        args.out,
        {
            "benchmark": "mesh_vs_local",
            "machine": info,
            "new_tokens": args.new_tokens,
            "seconds_per_generation": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
            "median_tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
            "median_ms_per_token": {k: round(v, 3) for k, v in ms.items()},
            "ratio_mesh_over_local": round(tps["mesh"] / tps["local"], 4),
            "mesh_overhead_ms_per_token": round(ms["mesh"] - ms["local"], 3),
            "same_tokens": tokens.get("mesh") == tokens.get("local"),
            "local_baseline": best,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    )


if __name__ == "__main__":
    main()
