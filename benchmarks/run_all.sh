#!/usr/bin/env bash
# Runs every CPU benchmark one after the other (never two at once: they share the cores), writing
# benchmarks/results/*.json. About 35 minutes on 2 cores. Usage: bash benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
python benchmarks/serving_speed.py --reps 10 --new-tokens 64 --out "$out/serving_speed.json"
python benchmarks/serving_speed.py --variants farworker:passive,farworker:single,petals --reps 12 --new-tokens 64 \
  --out "$out/serving_speed_3way.json"
python benchmarks/serving_speed.py --one-at-a-time 4 --reps 6 --variants farworker:passive,farworker:single,petals \
  --new-tokens 64 --out "$out/serving_speed_alone.json"
python benchmarks/mesh_vs_local.py --rounds 3 --reps 5 --new-tokens 64 --out "$out/mesh_vs_local.json"
python benchmarks/time_to_ready.py --rounds 4 --out "$out/time_to_ready.json"
python benchmarks/idle_cost.py --windows 3 --window 60 --out "$out/idle_cost.json"
python benchmarks/handoff_probe.py --out "$out/handoff_probe.json"
python benchmarks/usage_hold_cost.py --rounds 7 --n 300 --out "$out/usage_hold_cost.json"
python benchmarks/gpu_run.py --cpu --out "$out/gpu_run_cpu_dry_run.json"
python benchmarks/probe_cost.py --probes 1000 --out "$out/probe_cost.json"
python benchmarks/probe_cost.py --sweep-only --out "$out/probe_int8_sweep.json"
python benchmarks/page_load.py --workers 100 --rounds 30 --browser --out "$out/page_load.json"
