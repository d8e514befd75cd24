"""Benchmark 3: time from process start to ready, `farworker run` against petals' own CLI.

farworker: process start -> READY=1 on a unix datagram socket we bind as NOTIFY_SOCKET (farworker sends it
only once the DHT lists its blocks online). Raw petals: process start -> "Started" in its log (hivemind's
runtime; petals has no readiness signal). farworker's log has the same "Started" line, reported too, so
the two can also be compared like for like. Warm cache: one unmeasured start of each first (weights in
the page cache, farworker's throughput figure cached). Starts alternate F, P, P, F, ...; one server at a time.

    python benchmarks/time_to_ready.py --rounds 4 --out benchmarks/results/time_to_ready.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import benchlib as bl


def one_start(kind: str, work: Path, api_url: str, model: Path, index: int) -> dict:
    server = (
        bl.start_farworker(work, f"farworker-{index}", api_url)
        if kind == "farworker"
        else bl.start_raw_petals(work, f"petals-{index}", model)
    )
    try:
        ready = server.wait_ready(timeout=300)
        started = server.log_started_at()
        # petals' Server.run() first sleeps uniform(0, 2 * mean_block_selection_delay) = 0-10 s by default
        # ("decreases the probability of a race" between servers started together), then asks the DHT and
        # announces "joining". Both servers go through it; measure it from the log lines around it.
        before = server.log_line_wall_time("Connected to DHT as" if kind == "farworker" else "Attention cache for")
        joining = server.log_line_wall_time("are joining")
        gap = joining - before if before is not None and joining is not None else None
        return {
            "ready_s": round(ready, 3),
            "runtime_started_s": round(started - server.started_at, 3) if started is not None else None,
            "block_selection_gap_s": round(gap, 3) if gap is not None else None,
            "ready_minus_selection_gap_s": round(ready - gap, 3) if gap is not None else None,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="measured starts of each server (bounded)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-bench-ready-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = {"farworker": [], "petals": []}
    try:
        with bl.coordinator(work) as coord:
            for kind in ("farworker", "petals"):  # warm-up, not counted
                one_start(kind, work, coord.url, model, 0)
            for i in range(args.rounds):
                order = ["farworker", "petals"] if i % 2 == 0 else ["petals", "farworker"]
                for kind in order:
                    runs[kind].append(one_start(kind, work, coord.url, model, i + 1))
                    bl.log(f"round {i}: {kind} {runs[kind][-1]}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: bl.median([r["ready_s"] for r in v]) for k, v in runs.items()}
    no_gap = {
        k: bl.median([r["ready_minus_selection_gap_s"] for r in v if r["ready_minus_selection_gap_s"]])
        for k, v in runs.items()
    }
    fw_started = bl.median([r["runtime_started_s"] for r in runs["farworker"] if r["runtime_started_s"]])
    bl.write_json(
        args.out,
        {
            "benchmark": "time_to_ready",
            "machine": info,
            "runs": runs,
            "median_s": {
                "farworker_READY=1": med["farworker"],
                "farworker_runtime_Started": fw_started,
                "petals_runtime_Started": med["petals"],
            },
            "ratio_farworker_ready_over_petals_started": round(med["farworker"] / med["petals"], 3),
            "ratio_farworker_started_over_petals_started": round(fw_started / med["petals"], 3) if fw_started else None,
            "median_block_selection_gap_s": {
                k: bl.median([r["block_selection_gap_s"] for r in v if r["block_selection_gap_s"] is not None])
                for k, v in runs.items()
            },
            "median_ready_minus_selection_gap_s": no_gap,
            "ratio_without_selection_gap": round(no_gap["farworker"] / no_gap["petals"], 3)
            if no_gap["farworker"] and no_gap["petals"]
            else None,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    )


if __name__ == "__main__":
    main()
