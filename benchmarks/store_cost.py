"""Benchmark 15: what the ledger store costs per worker request, before and after SQLAlchemy (issue 21).

One "request" is what a worker's report costs the store: consume_nonce, heartbeat and add_usage of one record,
three transactions. Measured, in interleaved repetitions on fresh databases: main's raw sqlite3 store (its
store.py at --baseline, loaded from git), the SQLAlchemy store on SQLite, and on a real Postgres started here
(tests/postgres_server.py: Debian's postgresql, its own port and directory, fsync off as in the tests); the new
stores also with --threads threads at once (each its own worker). Milliseconds per request, medians.

    python benchmarks/store_cost.py --reps 5 --requests 300 --out benchmarks/results/store_cost.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import ROOT, log, machine_info, median, write_json

sys.path.insert(0, str(ROOT / "tests"))
from postgres_server import PostgresServer  # noqa: E402

from farworker.coordinator.store import Store  # noqa: E402

T0 = 1_800_000_000.0


def baseline_store(commit: str, work: Path):
    """main's Store class as of ``commit`` (raw sqlite3), imported from its source."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:farworker/coordinator/store.py"],
                            capture_output=True, text=True, check=True).stdout
    path = work / "baseline_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_store", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Store


def registration(n: int) -> dict:
    return {"peer_id": f"12D3KooWBench{n}", "public_key": "k", "wallet_address": "0x" + "ab" * 20,
            "model_name": "farworker-tiny-llama", "blocks": [0, 2], "total_blocks": 4, "torch_dtype": "float32",
            "quant_type": "none", "location": "bench", "version": "0", "announce_maddrs": [], "hardware": {}}


def one_request(store, worker_id: str, peer: str, i: int) -> None:
    store.consume_nonce(peer, uuid.uuid4().hex, T0 + i, 180)
    store.heartbeat(worker_id, {"state": "online", "healthy": True}, T0 + i)
    store.add_usage(worker_id, [{"id": str(uuid.uuid4()), "session_id": f"s{i}", "blocks": [0, 2], "tokens": 5,
                                 "steps": 5, "started_at": T0, "ended_at": T0}], T0 + i, lambda a, b: 0.5, 1.0, 0.001)


def ms_per_request(store, requests: int, threads: int) -> float:
    workers = [(store.register(registration(t), T0, 30.0), f"12D3KooWBench{t}") for t in range(threads)]
    per_thread = requests // threads
    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: [one_request(store, *workers[t], i) for i in range(per_thread)], range(threads)))
    return (time.perf_counter() - began) / (per_thread * threads) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--baseline", default="8785fc5", help="commit of main's raw sqlite3 store")
    parser.add_argument("--out")
    args = parser.parse_args()
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="store-cost-"))
    Baseline = baseline_store(args.baseline, work)
    server = PostgresServer.start()
    runs: dict[str, list[float]] = {}
    try:
        for rep in range(args.reps):
            cases = {
                "main sqlite3, 1 thread": (lambda r=rep: Baseline(work / f"main{r}.sqlite"), 1),
                "SQLAlchemy SQLite, 1 thread": (lambda r=rep: Store(work / f"new{r}.sqlite"), 1),
                "Postgres, 1 thread": (lambda: Store(server.new_database()), 1),
                f"SQLAlchemy SQLite, {args.threads} threads": (lambda r=rep: Store(work / f"new{r}t.sqlite"),
                                                               args.threads),
                f"Postgres, {args.threads} threads": (lambda: Store(server.new_database()), args.threads),
            }
            for name, (make, threads) in cases.items():
                store = make()
                try:
                    runs.setdefault(name, []).append(ms_per_request(store, args.requests, threads))
                finally:
                    store.close()
            log(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in runs.items()))
    finally:
        server.stop()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, {"machine": info, "ms_per_request": runs,
                          "median_ms_per_request": {k: round(median(v), 2) for k, v in runs.items()}})


if __name__ == "__main__":
    main()
