"""Benchmark 1: client tokens/s through `farworker run` against petals' own `run_server` CLI.

Every server holds all 4 blocks of the embedded tiny Llama (float32, CPU), each in its own new swarm on
loopback, and all stay up for the whole run. Each has its own client process using the same thread
policy as its server side: a farworker variant `farworker:<policy>` runs `farworker run` with
FARLABS_THREAD_POLICY=<policy> (default policy: passive) and its client applies the same policy; the
raw petals server and its client keep torch's defaults. Repetitions are interleaved and the order
rotates every repetition, so drift on a shared machine falls on all; the figure per farworker variant is
the ratio of its median tokens/s to raw petals' (and the median of the per-repetition ratios as a check).

    python benchmarks/serving_speed.py --reps 10 --new-tokens 64 --out benchmarks/results/serving_speed.json
    python benchmarks/serving_speed.py --variants farworker:passive,farworker:single,petals --reps 12 ...

A third part picks the tensor hand-off: `farworker:single:shm` keeps torch's shared-memory files for every
tensor (farworker/petals/tensor_handoff.py; the default sends small tensors as bytes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

import benchlib as bl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="timed generations per server (bounded)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--variants",
        default="farworker:passive,petals",
        help="comma list of farworker:<passive|single|spin> and petals",
    )
    parser.add_argument(
        "--one-at-a-time",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: ROUNDS rounds in which each variant runs alone (its server and client only, "
        "--reps generations), order alternating; the others are stopped meanwhile",
    )
    parser.add_argument("--rep-timeout", type=float, default=120.0, help="seconds one generation may take")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    parser.add_argument("--work-dir", default=None, help="keep logs here (default: a temporary dir, removed)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "petals" not in variants:
        parser.error("--variants must include petals (the baseline)")

    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.one_at_a_time:
        return one_at_a_time(args, variants, info, model, work)
    servers: dict[str, bl.Server] = {}
    clients: dict[str, bl.MeshClientProcess] = {}
    result = {
        "benchmark": "serving_speed",
        "machine": info,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "variants": variants,
    }
    times = {v: [] for v in variants}
    tokens = {}
    rss, stops = {}, {}
    try:
        with bl.coordinator(work) as coord:
            client_policy = {}
            for v in variants:
                servers[v], client_policy[v] = start(v, work, slug(v), coord.url, model)
            for v, server in servers.items():
                server.wait_ready()
                bl.log(f"{v} ready")
            for v, server in servers.items():
                clients[v] = bl.MeshClientProcess(
                    work, "client-" + slug(v), server.initial_peer, model,
                    client_policy[v], extra_env=variant_settings(v)[1],
                )
            for client in clients.values():  # warm-up: route discovery, first-call costs
                client.generate(bl.PROMPT_IDS, args.new_tokens)
            for rep in range(args.reps):
                shift = rep % len(variants)
                order = variants[shift:] + variants[:shift]
                if (rep // len(variants)) % 2:
                    order.reverse()
                try:
                    for v in order:
                        answer = clients[v].generate(bl.PROMPT_IDS, args.new_tokens, timeout=args.rep_timeout)
                        times[v].append(answer["seconds"])
                        tokens[v] = answer["tokens"]
                except RuntimeError as error:  # a generation that never finished: record it, keep what we have
                    result["hung"] = {
                        "server": v,
                        "rep": rep,
                        "timeout_s": args.rep_timeout,
                        "error": str(error)[:300],
                        "server_log_tail": servers[v].log_text().splitlines()[-8:],
                        "work_dir_kept": str(work),
                    }
                    args.work_dir = args.work_dir or str(work)  # keep the logs
                    bl.log(f"rep {rep}: {v} did not answer in {args.rep_timeout:.0f} s; stopping the loop")
                    done = min(map(len, times.values()))
                    times = {k: t[:done] for k, t in times.items()}  # whole rounds only
                    break
                bl.log(f"rep {rep}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in variants))
            rss = {v: s.tree.peak_rss for v, s in servers.items()}
    finally:
        for client in clients.values():
            client.close()
        stops = {v: s.stop() for v, s in servers.items()}
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    tps = {k: [args.new_tokens / s for s in t] for k, t in times.items()}
    med = {k: bl.median(t) for k, t in tps.items()}
    ratios, pair_medians, pair_mins = {}, {}, {}
    for v in variants:
        if v == "petals" or not med.get(v):
            continue
        pairs = [f / p for f, p in zip(tps[v], tps["petals"], strict=False)]
        ratios[v] = round(med[v] / med["petals"], 3)
        pair_medians[v] = round(bl.median(pairs), 3)
        pair_mins[v] = round(min(pairs), 3)
    result.update(
        {
            "tokens_per_s": {k: [round(x, 2) for x in t] for k, t in tps.items()},
            "median_tokens_per_s": {k: round(x, 2) for k, x in med.items() if x},
            "median_ms_per_token": {k: round(1000 / x, 3) for k, x in med.items() if x},
            "ratio_over_petals": ratios,
            "median_of_pair_ratios": pair_medians,
            "min_pair_ratio": pair_mins,
            "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
            "peak_rss_mib_while_serving": {k: round(x / 2**20, 1) for k, x in rss.items()},
            "stops": stops,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        }
    )
    bl.write_json(args.out, result)


def start(variant: str, work: Path, name: str, api_url: str, model: Path) -> tuple[bl.Server, str]:
    """The server for a variant and its client's policy."""
    if variant == "petals":
        return bl.start_raw_petals(work, name, model), "default"
    policy, extra = variant_settings(variant)
    env = {"FARLABS_THREAD_POLICY": policy, **extra}
    server = bl.start_farworker(work, name, api_url, extra_env=env)
    return server, {"spin": "default"}.get(policy, policy)


def slug(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", variant)


def variant_settings(variant: str) -> tuple[str, dict[str, str]]:
    """`farworker:POLICY[:HANDOFF][:K=V+K=V]` -> the thread policy and the extra environment that server and
    client both get. HANDOFF `shm` keeps torch's shared-memory reducer for every tensor
    (farworker/petals/tensor_handoff.py); K=V pairs try a setting, e.g. `farworker:single:bytes:GOMAXPROCS=1`."""
    if variant == "petals":
        return "default", {}
    _, policy, *rest = variant.split(":")
    extra: dict[str, str] = {}
    for part in rest:
        if "=" in part:
            extra.update(pair.split("=", 1) for pair in part.split("+"))
        else:
            extra["FARWORKER_TENSOR_HANDOFF"] = part
    return policy, extra


def one_at_a_time(args, variants: list[str], info: dict, model: Path, work: Path) -> None:
    """Each round runs every variant alone, in alternating order: nothing else of ours is alive meanwhile."""
    times = {v: [] for v in variants}
    tokens = {}
    try:
        with bl.coordinator(work) as coord:
            for rnd in range(args.one_at_a_time):
                order = variants if rnd % 2 == 0 else list(reversed(variants))
                for v in order:
                    server, policy = start(v, work, f"{slug(v)}-{rnd}", coord.url, model)
                    client = None
                    try:
                        server.wait_ready()
                        client = bl.MeshClientProcess(
                            work, f"client-{slug(v)}-{rnd}", server.initial_peer,
                            model, policy, extra_env=variant_settings(v)[1],
                        )
                        client.generate(bl.PROMPT_IDS, args.new_tokens)  # warm-up
                        for _ in range(args.reps):
                            answer = client.generate(bl.PROMPT_IDS, args.new_tokens, timeout=args.rep_timeout)
                            times[v].append(answer["seconds"])
                            tokens[v] = answer["tokens"]
                    finally:
                        if client is not None:
                            client.close()
                        server.stop()
                    bl.log(f"round {rnd} {v}: median {bl.median(times[v][-args.reps :]):.3f} s")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: bl.median([args.new_tokens / s for s in t]) for k, t in times.items()}
    bl.write_json(
        args.out,
        {
            "benchmark": "serving_speed",
            "mode": "one_at_a_time",
            "machine": info,
            "variants": variants,
            "rounds": args.one_at_a_time,
            "reps_per_round": args.reps,
            "new_tokens": args.new_tokens,
            "seconds_per_generation": {k: [round(x, 4) for x in t] for k, t in times.items()},
            "median_tokens_per_s": {k: round(x, 2) for k, x in med.items()},
            "median_ms_per_token": {k: round(1000 / x, 3) for k, x in med.items()},
            "ratio_over_petals": {k: round(x / med["petals"], 3) for k, x in med.items() if k != "petals"},
            "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    )


if __name__ == "__main__":
    main()
