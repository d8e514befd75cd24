"""Benchmark 4: what farworker's own work costs: idle CPU and memory, against petals' own CLI.

Both servers hold the same 4 blocks of the tiny Llama (float32, CPU) and run at the same time, so
whatever else the machine does falls on both. farworker reports to a local reference coordinator
(heartbeats every 30 s, its default), checks health and writes its status file every 5 s, polls NVML
(a no-op without a driver) and keeps its outbox. First each server serves a few generations (so memory
is measured after real use), then both sit idle and we read the CPU time (user+system, summed over each
process tree) over --windows windows of --window seconds. farworker's own cost = its tree's CPU minus
raw petals' tree's CPU over the same window, given in CPU seconds per hour and in % of one core.
Memory: peak of the summed RSS over each process tree during the whole run (sampled every 0.5 s), and
the summed PSS (shared pages split fairly, so libraries mapped by 10+ processes are not counted 10 times)
at the end.

    python benchmarks/idle_cost.py --windows 3 --window 60 --out benchmarks/results/idle_cost.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import benchlib as bl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per idle window")
    parser.add_argument("--load-reps", type=int, default=3, help="generations per server before idling")
    parser.add_argument("--out", default=None)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-bench-idle-"))
    work.mkdir(parents=True, exist_ok=True)
    servers = {}
    windows = []
    try:
        with bl.coordinator(work) as coord:
            servers["farworker"] = bl.start_farworker(work, "farworker", coord.url)
            servers["petals"] = bl.start_raw_petals(work, "petals", model)
            for server in servers.values():
                server.wait_ready()
            for kind, policy in (("farworker", "passive"), ("petals", "default")):
                client = bl.MeshClientProcess(work, f"client-{kind}", servers[kind].initial_peer, model, policy)
                try:
                    for _ in range(args.load_reps):
                        client.generate(bl.PROMPT_IDS, 64)
                finally:
                    client.close()
            bl.log("served; settling 10 s")
            time.sleep(10)
            for w in range(args.windows):
                before = {k: s.tree.cpu_seconds() for k, s in servers.items()}
                main_before = {k: before[k].get(s.proc.pid, 0.0) for k, s in servers.items()}
                begin = time.monotonic()
                time.sleep(args.window)
                seconds = time.monotonic() - begin
                after = {k: s.tree.cpu_seconds() for k, s in servers.items()}
                cpu = {k: bl.cpu_delta(before[k], after[k]) for k in servers}
                main_cpu = {k: after[k].get(s.proc.pid, 0.0) - main_before[k] for k, s in servers.items()}
                windows.append(
                    {
                        "seconds": round(seconds, 2),
                        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
                        "main_process_cpu_s": {k: round(v, 3) for k, v in main_cpu.items()},
                        "processes": {k: len(after[k]) for k in servers},
                    }
                )
                bl.log(f"window {w}: {windows[-1]}")
            full = {k: s.tree.memory_full() for k, s in servers.items()}
            pss = {k: v["pss"] for k, v in full.items()}
            rss_end = {k: s.tree.rss() for k, s in servers.items()}
            peak = {k: s.tree.peak_rss for k, s in servers.items()}
    finally:
        stops = {k: s.stop() for k, s in servers.items()}
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    def per_hour(key: str, kind: str) -> list[float]:
        return [w[key][kind] / w["seconds"] * 3600 for w in windows]

    diff = [(w["cpu_s"]["farworker"] - w["cpu_s"]["petals"]) / w["seconds"] * 3600 for w in windows]
    main_diff = [
        (w["main_process_cpu_s"]["farworker"] - w["main_process_cpu_s"]["petals"]) / w["seconds"] * 3600
        for w in windows
    ]
    mib = 2**20
    bl.write_json(
        args.out,
        {
            "benchmark": "idle_cost",
            "machine": info,
            "windows": windows,
            "idle_cpu_s_per_hour_median": {
                k: round(bl.median(per_hour("cpu_s", k)), 1) for k in ("farworker", "petals")
            },
            "farworker_extra_cpu_s_per_hour_median": round(bl.median(diff), 1),
            "farworker_extra_pct_of_one_core_median": round(bl.median(diff) / 36, 3),
            "main_process_extra_cpu_s_per_hour_median": round(bl.median(main_diff), 1),
            "main_process_extra_pct_of_one_core_median": round(bl.median(main_diff) / 36, 3),
            "peak_rss_sum_mib": {k: round(v / mib, 1) for k, v in peak.items()},
            "rss_sum_mib_at_end": {k: round(v / mib, 1) for k, v in rss_end.items()},
            "pss_sum_mib_at_end": {k: round(v / mib, 1) for k, v in pss.items()},
            "uss_sum_mib_at_end": {k: round(v["uss"] / mib, 1) for k, v in full.items()},
            "processes_at_end": {k: v["processes"] for k, v in full.items()},
            "main_process_mib_at_end": {
                k: {m: round(x / mib, 1) for m, x in v["main"].items()} for k, v in full.items()
            },
            "children_sum_mib_at_end": {
                k: {m: round(x / mib, 1) for m, x in v["children"].items()} for k, v in full.items()
            },
            "farworker_extra_peak_rss_mib": round((peak["farworker"] - peak["petals"]) / mib, 1),
            "farworker_extra_pss_mib": round((pss["farworker"] - pss["petals"]) / mib, 1),
            "stops": stops,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    )


if __name__ == "__main__":
    main()
