"""Benchmark 17: completions from 16 concurrent clients through 2 coordinator replicas on one Postgres, against 1.

The same real mesh as benchmark 8 (a bootstrap peer, two `farworker run` workers splitting the tiny model) is
served by three `farworker coordinator` processes side by side: a pair sharing one Postgres database (the
production setup, docs/ansible.md) and a single replica on a database of its own on the same server (a real
Postgres: tests/postgres_server.py). Each configuration is reached through its own real haproxy running the
coordinator role's haproxy.cfg (tests/haproxy_balancer.py: leastconn, health checks on /healthz), one server
behind the single replica's and two behind the pair's, so both pay the same hop. Without haproxy installed (or
with ``--no-balancer``) each client sends its requests to the replica URLs in turn instead.

Each configuration gets ``--clients`` client threads sending greedy completions of ``--new-tokens`` tokens back
to back for ``--seconds``, in alternating rounds (A/B, B/A, ...). Reported per configuration (median over
rounds): aggregate completion tokens/s, mean and p99 request latency. A replica runs at most 8 generations at once
(max_active_generations, the default): 16 clients queue on one replica, not on two. The load average before and
after is recorded (the machine may be shared).

    python benchmarks/coordinator_replicas.py --rounds 2 --seconds 20 --new-tokens 8 \
        --out benchmarks/results/coordinator_replicas.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import requests  # noqa: E402
from benchlib import ROOT, free_port, machine_info, write_json  # noqa: E402
from concurrent_completions import load  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from haproxy_balancer import HAPROXY, Balancer  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402

from farworker.local_mesh import (  # noqa: E402
    ManagedProcess,
    base_env,
    farworker_command,
    shared_cache_dir,
    start_bootstrap_peer,
    start_worker,
)
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint  # noqa: E402


def start_replica(work: Path, name: str, db: str, model: Path, peers: list[str]) -> tuple[ManagedProcess, str]:
    """One `farworker coordinator` process on ``db``, serving completions through the mesh; returns once it
    answers /healthz (deadline 90 s)."""
    port = free_port()
    proc = ManagedProcess(name, farworker_command(
        "coordinator", "--port", str(port), "--db", db, "--model-path", str(model), "--model-name", TINY_MODEL_NAME,
        *[arg for peer in peers for arg in ("--initial-peer", peer)], "--probe-period", "0"), base_env(),
        work / f"{name}.log").start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            if not proc.alive:
                break
        time.sleep(0.2)
    proc.stop(30)
    raise RuntimeError(f"{name} did not answer:\n{proc.log_tail()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-balancer", action="store_true", help="clients go round-robin over the replica URLs")
    args = parser.parse_args()
    load_before = os.getloadavg()
    model = ensure_tiny_checkpoint(shared_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="fw-replicas-"))
    postgres = PostgresServer.start()
    boot, peers = start_bootstrap_peer(work)
    workers = [start_worker(work, f"w{i}", "http://127.0.0.1:9", peers, span) for i, span in enumerate(("0:2", "2:4"))]
    replicas: list[ManagedProcess] = []
    balancers: list[Balancer] = []
    use_balancer = HAPROXY is not None and not args.no_balancer
    replica_urls: dict[str, list[str]] = {}
    configs: dict[str, list[str]] = {}
    runs: dict[str, list[dict]] = {"one_replica": [], "two_replicas": []}
    try:
        for w in workers:
            w.wait_online(180)
        shared, alone = postgres.new_database(), postgres.new_database()
        for name, db, config in (("replica-a", shared, "two_replicas"), ("replica-b", shared, "two_replicas"),
                                 ("replica-1", alone, "one_replica")):
            proc, url = start_replica(work, name, db, model, peers)
            replicas.append(proc)
            replica_urls.setdefault(config, []).append(url)
            load(f"{url}/v1/completions", 1, 2, args.new_tokens)  # warm its petals client
        for config, urls in replica_urls.items():
            if use_balancer:
                balancers.append(Balancer(work, [int(url.rsplit(":", 1)[1]) for url in urls]).start())
                configs[config] = [f"{balancers[-1].url}/v1/completions"]
            else:
                configs[config] = [f"{url}/v1/completions" for url in urls]
        order = ["one_replica", "two_replicas"]
        for _ in range(args.rounds):
            for name in order:
                run = load(configs[name], args.clients, args.seconds, args.new_tokens)
                runs[name].append(run)
                print(json.dumps({"config": name, **run}), flush=True)
            order.reverse()
    finally:
        for balancer in balancers:
            balancer.stop()
        for proc in replicas:
            proc.stop(30)
        for w in workers:
            w.proc.stop(30)
        boot.stop()
        postgres.stop()
    summary = {name: {key: round(statistics.median(r[key] for r in runs[name]), 3)
                      for key in ("tokens_per_s", "mean_latency_s", "p99_latency_s", "requests")} for name in runs}
    summary["two / one tokens_per_s"] = round(summary["two_replicas"]["tokens_per_s"]
                                              / summary["one_replica"]["tokens_per_s"], 2)
    out = {"summary": summary, "runs": runs, "balancer": "haproxy" if use_balancer else "none",
           "clients": args.clients, "new_tokens": args.new_tokens,
           "seconds": args.seconds, "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "machine": machine_info()}
    write_json(str(args.out) if args.out else None, out)


if __name__ == "__main__":
    main()
