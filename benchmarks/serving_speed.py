"""Benchmark 1: client tokens/s through `farworker run` against petals' own `run_server` CLI.

Both servers hold all 4 blocks of the embedded tiny Llama (float32, CPU), each in its own new swarm on
loopback, and both stay up for the whole run. Each has its own client process, using the same thread
policy as its server side: farworker's client applies farworker's policy ("passive"), the raw petals
client keeps torch's defaults, as the raw server does. Repetitions alternate A/B, B/A, ... so drift on
a shared machine falls on both; the figure is the ratio of the medians (and the median of the per-pair
ratios as a check).

    python benchmarks/serving_speed.py --reps 10 --new-tokens 64 --out benchmarks/results/serving_speed.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import benchlib as bl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="timed generations per server (bounded)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--farworker-client-policy", default="passive", choices=("passive", "single", "default"))
    parser.add_argument("--rep-timeout", type=float, default=120.0, help="seconds one generation may take")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    parser.add_argument("--work-dir", default=None, help="keep logs here (default: a temporary dir, removed)")
    args = parser.parse_args()

    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    servers, clients = [], []
    result = {"benchmark": "serving_speed", "machine": info, "new_tokens": args.new_tokens, "reps": args.reps}
    try:
        with bl.coordinator(work) as coord:
            fw = bl.start_farworker(work, "farworker", coord.url)
            servers.append(fw)
            raw = bl.start_raw_petals(work, "petals", model)
            servers.append(raw)
            for server in servers:
                server.wait_ready()
                bl.log(f"{server.kind} ready")
            a = bl.MeshClientProcess(work, "client-farworker", fw.initial_peer, model, args.farworker_client_policy)
            clients.append(a)
            b = bl.MeshClientProcess(work, "client-petals", raw.initial_peer, model, "default")
            clients.append(b)
            for client in clients:  # warm-up: route discovery, first-call costs
                client.generate(bl.PROMPT_IDS, args.new_tokens)
            times = {"farworker": [], "petals": []}
            tokens = {}
            for rep in range(args.reps):
                order = [("farworker", a), ("petals", b)]
                if rep % 2:
                    order.reverse()
                try:
                    for name, client in order:
                        answer = client.generate(bl.PROMPT_IDS, args.new_tokens, timeout=args.rep_timeout)
                        times[name].append(answer["seconds"])
                        tokens[name] = answer["tokens"]
                except RuntimeError as error:  # a generation that never finished: record it, keep what we have
                    server = fw if name == "farworker" else raw
                    result["hung"] = {"server": name, "rep": rep, "timeout_s": args.rep_timeout,
                                      "error": str(error)[:300],
                                      "server_log_tail": server.log_text().splitlines()[-8:],
                                      "work_dir_kept": str(work)}
                    args.work_dir = args.work_dir or str(work)  # keep the logs
                    bl.log(f"rep {rep}: {name} did not answer in {args.rep_timeout:.0f} s; stopping the loop")
                    times = {k: v[:min(map(len, times.values()))] for k, v in times.items()}  # whole pairs only
                    break
                bl.log(f"rep {rep}: farworker {times['farworker'][-1]:.3f} s, petals {times['petals'][-1]:.3f} s")
            rss = {s.kind: s.tree.peak_rss for s in servers}
    finally:
        for client in clients:
            client.close()
        stops = {s.kind: s.stop() for s in servers}
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    tps = {k: [args.new_tokens / s for s in v] for k, v in times.items()}
    med = {k: bl.median(v) for k, v in tps.items()}
    pair_ratios = [f / p for f, p in zip(tps["farworker"], tps["petals"])]
    result.update({
        "tokens_per_s": {k: [round(x, 2) for x in v] for k, v in tps.items()},
        "median_tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "median_ms_per_token": {k: round(1000 / v, 3) for k, v in med.items()},
        "ratio_farworker_over_petals": round(med["farworker"] / med["petals"], 3),
        "median_of_pair_ratios": round(bl.median(pair_ratios), 3),
        "min_pair_ratio": round(min(pair_ratios), 3),
        "same_tokens": tokens.get("farworker") == tokens.get("petals"),
        "peak_rss_mib_while_serving": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "stops": stops,
        "loadavg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
    })
    bl.write_json(args.out, result)


if __name__ == "__main__":
    main()
