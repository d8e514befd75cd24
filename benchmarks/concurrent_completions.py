"""Benchmark 8: completions from many clients at once, through the coordinator and a two-worker tiny mesh.

The same mesh (a bootstrap peer, two `farworker run` workers splitting the tiny model) is served by two
coordinators side by side: one that runs one generation at a time (`max_active_generations=1`, what the old
global lock did) and one that runs up to max(8, the highest level) (8 is the default). For each concurrency level,
each coordinator gets ``level`` client threads sending greedy completions of ``--new-tokens`` tokens back to back
for ``--seconds``; levels and coordinators alternate (A/B, B/A, ...). Reported: aggregate completion tokens/s,
mean latency, and the p50/p99 per-token latency (a request's latency / its completion tokens, over requests).
The workers batch concurrent sessions' steps (FARLABS_STEP_BATCHING, default on); ``--worker-env
FARLABS_STEP_BATCHING=false`` runs the same without.

    python benchmarks/concurrent_completions.py --levels 1,2,4,8,16 --seconds 15 \
        --out benchmarks/results/concurrent_completions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import requests  # noqa: E402

from farworker.coordinator.app import Settings  # noqa: E402
from farworker.coordinator.service import RunningCoordinator  # noqa: E402
from farworker.local_mesh import shared_cache_dir, start_bootstrap_peer, start_worker  # noqa: E402
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint  # noqa: E402


def load(url: str | list[str], level: int, seconds: float, new_tokens: int) -> dict:
    """``level`` clients back to back for ``seconds``. Several URLs (replicas without a load balancer): each client
    sends its requests to them in turn, round-robin, starting at a different one."""
    urls = [url] if isinstance(url, str) else url
    latencies: list[float] = []
    per_token: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        prompt = [1, 5 + index, 40 + index]
        sent = index
        while time.monotonic() < deadline:
            started = time.monotonic()
            target, sent = urls[sent % len(urls)], sent + 1
            answer = requests.post(target, json={"prompt": prompt, "max_tokens": new_tokens}, timeout=300)
            answer.raise_for_status()
            with lock:
                latencies.append(time.monotonic() - started)
                completion_tokens = answer.json()["usage"]["completion_tokens"]
                tokens[0] += completion_tokens
                per_token.append(latencies[-1] / max(1, completion_tokens))

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    per_token.sort()
    ordered = sorted(latencies)
    return {"tokens_per_s": round(tokens[0] / elapsed, 2), "mean_latency_s": round(statistics.mean(latencies), 3),
            "requests": len(latencies), "p50_token_ms": round(1000 * per_token[len(per_token) // 2], 2),
            "p99_token_ms": round(1000 * per_token[min(len(per_token) - 1, int(0.99 * len(per_token)))], 2),
            "p99_latency_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--worker-env", action="append", default=[], metavar="K=V", help="workers' environment")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = ensure_tiny_checkpoint(shared_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="fw-concurrency-"))
    boot, peers = start_bootstrap_peer(work)
    worker_env = dict(pair.split("=", 1) for pair in args.worker_env)
    workers = [start_worker(work, f"w{i}", "http://127.0.0.1:9", peers, span, worker_env)
               for i, span in enumerate(("0:2", "2:4"))]
    coordinators = {}
    results: dict[str, dict[int, list[dict]]] = {"one_at_a_time": {}, "concurrent": {}}
    try:
        for w in workers:
            w.wait_online(180)
        for name, active in (("one_at_a_time", 1), ("concurrent", max(8, *levels))):
            settings = Settings(db_path=work / f"{name}.sqlite3", model_path=model, model_name=TINY_MODEL_NAME,
                                initial_peers=tuple(peers), probe_period_s=0, max_active_generations=active)
            coordinators[name] = RunningCoordinator(settings).start()
            load(f"{coordinators[name].url}/v1/completions", 1, 3, args.new_tokens)  # warm the petals client
        order = list(coordinators)
        for level in levels + levels[::-1]:
            for name in order:
                run = load(f"{coordinators[name].url}/v1/completions", level, args.seconds, args.new_tokens)
                results[name].setdefault(level, []).append(run)
                print(json.dumps({"coordinator": name, "level": level, **run}), flush=True)
            order.reverse()
    finally:
        for c in coordinators.values():
            c.stop()
        for w in workers:
            w.proc.stop(30)
        boot.stop()
    summary = {}
    for level in levels:
        one = statistics.median(r["tokens_per_s"] for r in results["one_at_a_time"][level])
        many = statistics.median(r["tokens_per_s"] for r in results["concurrent"][level])
        summary[level] = {
            "one_at_a_time_tok_s": one, "concurrent_tok_s": many, "ratio": round(many / one, 2),
            "one_at_a_time_latency_s": statistics.median(r["mean_latency_s"] for r in results["one_at_a_time"][level]),
            "concurrent_latency_s": statistics.median(r["mean_latency_s"] for r in results["concurrent"][level]),
            **{f"{name}_{key}": statistics.median(r[key] for r in results[name][level])
               for name in results for key in ("p50_token_ms", "p99_token_ms")},
        }
    if 1 in summary and 8 in summary:
        summary["concurrent: 8 / 1"] = round(summary[8]["concurrent_tok_s"] / summary[1]["concurrent_tok_s"], 2)
    out = {"summary": summary, "runs": results, "load_average": os.getloadavg(), "new_tokens": args.new_tokens,
           "worker_env": worker_env}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
