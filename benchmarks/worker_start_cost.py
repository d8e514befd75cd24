"""Benchmark 11: what one `farworker run` start costs, this checkout against an older commit, side by side.

Each start: one `farworker run` holding every block of the tiny model in a new swarm, a coordinator on loopback
(in this process). Measured at READY=1 (the DHT lists the blocks online): wall seconds from process start, and
the CPU seconds (user + system) the worker's process tree spent to get there (the figure that stays meaningful
on a loaded machine, where wall time mostly measures the neighbours). Also the wall gap between the log lines
"Loaded ... block 0" and "... block 1" (where petals builds its first server backend).

The baseline is `git archive REV` unpacked in a temporary directory, started with PYTHONPATH pointing there, so
both run the same venv and the same script; starts alternate (B, A, A, B, ...), one at a time, after one
unmeasured warm-up start of each (page cache, throughput cache).

    python benchmarks/worker_start_cost.py --baseline main --rounds 5 --out benchmarks/results/worker_start_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import benchlib as bl


def loaded_gap(log_text: str) -> float | None:
    """Seconds between "Loaded ... block 0" and the next "Loaded ... block N" line, from their timestamps."""
    stamps = []
    for line in log_text.splitlines():
        if "] Loaded " in line and " block " in line:
            try:
                stamps.append(datetime.datetime.strptime(line[:19], "%b %d %H:%M:%S.%f"))
            except ValueError:
                return None
            if len(stamps) == 2:
                return round((stamps[1] - stamps[0]).total_seconds(), 3)
    return None


def one_start(work: Path, api_url: str, name: str, code_dir: Path, extra_env: dict[str, str]) -> dict:
    server = bl.start_farworker(work, name, api_url, extra_env={"PYTHONPATH": str(code_dir), **extra_env})
    try:
        ready = server.wait_ready(timeout=300)
        tree = server.tree
        cpu = tree.cpu_seconds()  # the live tree at READY
        main = server.proc.pid
        try:
            import psutil

            times = psutil.Process(main).cpu_times()
            reaped = times.children_user + times.children_system  # children that already ended (and were waited)
        except Exception:
            reaped = 0.0
        return {
            "ready_s": round(ready, 3),
            "cpu_s": round(sum(cpu.values()) + reaped, 3),
            "main_process_cpu_s": round(cpu.get(main, 0.0), 3),
            "loaded_block0_to_block1_s": loaded_gap(server.log_text()),
            "bitsandbytes_in_log": "bitsandbytes" in server.log_text(),
        }
    finally:
        server.stop()


def checkout(rev: str, into: Path) -> Path:
    root = bl.ROOT
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare against (e.g. main)")
    parser.add_argument("--rounds", type=int, default=5, help="measured starts of each (bounded)")
    parser.add_argument("--quant", default="none", help="FARLABS_QUANT_TYPE for every start (none, int8)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    info = bl.machine_info()
    work = Path(tempfile.mkdtemp(prefix="fw-bench-start-"))
    codes = {"baseline": checkout(args.baseline, work / "baseline-code"), "this": bl.ROOT}
    extra = {"FARLABS_QUANT_TYPE": args.quant}
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        with bl.coordinator(work) as coord:
            for kind in codes:  # warm-up, not counted
                one_start(work, coord.url, f"warm-{kind}", codes[kind], extra)
            for i in range(args.rounds):
                order = ["baseline", "this"] if i % 2 == 0 else ["this", "baseline"]
                for kind in order:
                    runs[kind].append(one_start(work, coord.url, f"{kind}-{i}", codes[kind], extra))
                    bl.log(f"round {i}: {kind} {runs[kind][-1]} load {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(kind: str, key: str):
        values = [r[key] for r in runs[kind] if r[key] is not None]
        return bl.median(values) if values else None

    keys = ("ready_s", "cpu_s", "main_process_cpu_s", "loaded_block0_to_block1_s")
    bl.write_json(args.out, {
        "benchmark": "worker_start_cost",
        "baseline": args.baseline,
        "quant_type": args.quant,
        "machine": info,
        "runs": runs,
        "median": {kind: {key: med(kind, key) for key in keys} for kind in runs},
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    })


if __name__ == "__main__":
    main()
