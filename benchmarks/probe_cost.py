"""Benchmark 9: spot checks on int8 workers, and what probing costs the coordinator and the worker.

Two real `farworker run` workers hold every block of the tiny Llama with int8 weights (petals' quant_type int8:
bitsandbytes' LLM.int8 linear layers, on CPU): an honest one, and an altered one (the same checkpoint with every
block's MLP output projection scaled by --alter, announced under the same DHT prefix). The coordinator's own
SpotChecker (its petals client, its float32 reference block) probes each directly, exactly as the probe loop does:
--probes probes of the honest worker and --altered-probes of the altered one. Then --dials direct dials of the
honest worker's announced address (the reachability check that goes with each probe).

Reported:
- the honest and altered relative errors (min, percentiles, max) against the int8 tolerance: how many honest
  probes would have quarantined the worker (must be 0) and how many altered ones passed;
- the coordinator's CPU seconds per probe (this process and its mesh client's p2p daemon; the float32 reference
  block loads as they happen: a random block of 4 each probe), per dial (its short-lived daemons included), and
  per worker per hour at the default period (300 s);
- the share of a worker's capacity probes use: the honest worker's CPU per probe (its process tree, less its
  idle rate) over the period, and the probe's work (8 positions x 1 block) over the token-blocks it serves in a
  period at its measured greedy decode rate through the mesh.

    python benchmarks/probe_cost.py --probes 1000 --out benchmarks/results/probe_cost.json

`--sweep-only` instead measures what int8 hides, in this process: each block of the tiny model with its MLP
output projection scaled by 1.02 / 1.05 / 1.1 / 1.2, quantized as petals' server quantizes it (convert_block,
int8), against the float32 block, --sweep-probes random inputs each (no workers, no network):

    python benchmarks/probe_cost.py --sweep-only --out benchmarks/results/probe_int8_sweep.json
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import benchlib as bl

PERIOD_S = 300.0  # the coordinator's default --probe-period
CLOSED_API = "http://127.0.0.1:9"  # no coordinator API: the workers serve and retry registration quietly


def altered_copy(model: Path, directory: Path, scale: float) -> Path:
    from safetensors.torch import load_file, save_file

    target = directory / model.name  # the same DHT prefix as the honest model
    shutil.copytree(model, target)
    weights = load_file(str(target / "model.safetensors"))
    for name in [n for n in weights if n.endswith("mlp.down_proj.weight")]:
        weights[name] = weights[name] * scale
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def p2pd_cpu() -> float:
    """CPU seconds of this process's own p2p daemons (the mesh client's), not the workers' trees."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=False):
        try:
            if child.name() == "p2pd":
                t = child.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def coordinator_cpu() -> float:
    own = time.process_time()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # dial daemons, started and ended
    return own + p2pd_cpu() + reaped.ru_utime + reaped.ru_stime


def spread(values: list[float]) -> dict:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"n": len(values), "min": ordered[0], "p50": statistics.median(ordered), "p99": pct(99),
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


def int8_sweep(model: Path, probes: int, scales=(1.0, 1.02, 1.05, 1.1, 1.2)) -> dict:
    import torch

    from farworker.coordinator.spot_check import PROBE_TOKENS, tolerance_for
    from farworker.petals.compat import import_petals

    petals = import_petals()
    from petals.server.from_pretrained import load_pretrained_block
    from petals.utils.convert_block import QuantType, convert_block

    config = petals.AutoDistributedConfig.from_pretrained(str(model))
    cpu, tolerance = torch.device("cpu"), tolerance_for("float32", "int8")
    errors: dict[float, list[float]] = {scale: [] for scale in scales}
    for block in range(config.num_hidden_layers):
        reference = load_pretrained_block(str(model), block, config=config, torch_dtype=torch.float32)
        served = {}
        for scale in scales:
            module = load_pretrained_block(str(model), block, config=config, torch_dtype=torch.float32)
            module.mlp.down_proj.weight.data *= scale
            served[scale] = convert_block(module, 0, config, (cpu,), cpu, quant_type=QuantType.INT8, freeze=True)
        generator = torch.Generator().manual_seed(block)
        for _ in range(probes):
            hidden = torch.randn(1, PROBE_TOKENS, config.hidden_size, generator=generator)
            with torch.inference_mode():
                expected = reference(hidden)[0]
                for scale, module in served.items():
                    answer = module(hidden)[0]
                    errors[scale].append(float((answer - expected).norm() / (expected - hidden).norm()))
    return {"tolerance": tolerance, "probes_per_block": probes, "by_scale": {
        str(scale): {**spread(values), "over_tolerance": sum(e > tolerance for e in values)}
        for scale, values in errors.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=1000, help="probes of the honest int8 worker")
    parser.add_argument("--altered-probes", type=int, default=100)
    parser.add_argument("--alter", type=float, default=1.2, help="scale of the altered worker's MLP output projections")
    parser.add_argument("--dials", type=int, default=30)
    parser.add_argument("--gen-reps", type=int, default=3, help="64-token generations to measure serving capacity")
    parser.add_argument("--sweep-only", action="store_true", help="only the in-process int8 sweep")
    parser.add_argument("--sweep-probes", type=int, default=250, help="random inputs per block and scale")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.sweep_only:
        info = bl.machine_info()
        sweep = int8_sweep(bl.tiny_model_dir(), args.sweep_probes)
        bl.write_json(args.out, {"benchmark": "probe_int8_sweep", "machine": info, **sweep})
        return

    from farworker.catalog import dht_prefix_for
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.coordinator.services.reachability import check as check_reachability
    from farworker.coordinator.spot_check import PROBE_TOKENS, SpotChecker, tolerance_for

    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(tempfile.mkdtemp(prefix="fw-bench-probe-"))
    int8 = {"FARLABS_QUANT_TYPE": "int8"}
    servers: dict[str, bl.Server] = {}
    mesh = None
    try:
        servers["honest"] = bl.start_farworker(work, "honest", CLOSED_API, extra_env=int8)
        servers["honest"].wait_ready()
        honest_peer = servers["honest"].initial_peer
        honest_id = honest_peer.rsplit("/", 1)[-1]
        mesh = MeshClient(model, [honest_peer], dht_prefix_for(model.name))
        mesh.warm()

        # serving capacity: greedy decode through the mesh while the honest worker is the only one
        mesh.generate(bl.PROMPT_IDS, 8, 0.0)  # warm-up
        rates = []
        for _ in range(args.gen_reps):
            begin = time.monotonic()
            out = mesh.generate(bl.PROMPT_IDS, 64, 0.0)
            rates.append(len(out.completion_ids) / (time.monotonic() - begin))
        tokens_per_s = statistics.median(rates)
        bl.log(f"honest int8 worker serves {tokens_per_s:.1f} tok/s through the mesh (4 blocks)")

        altered_model = altered_copy(model, work / "altered", args.alter)
        servers["altered"] = bl.start_farworker(work, "altered", CLOSED_API, model=str(altered_model), extra_env={
            **int8, "FARLABS_ALLOW_LOCAL_MODEL": "true", "FARLABS_NEW_SWARM": "false",
            "FARLABS_DHT_BOOTSTRAP": honest_peer})
        servers["altered"].wait_ready()
        altered_id = servers["altered"].initial_peer.rsplit("/", 1)[-1]

        checker = SpotChecker(mesh, seed=20261130)
        tolerance = tolerance_for("float32", "int8")
        checker.probe(honest_id, (0, 4), "float32", "int8")  # first forward: connections, lazy imports

        time.sleep(5)
        idle_before, idle_begin = servers["honest"].tree.cpu_seconds(), time.monotonic()
        time.sleep(20)
        idle_rate = bl.cpu_delta(idle_before, servers["honest"].tree.cpu_seconds()) / (time.monotonic() - idle_begin)

        honest_errors, failures = [], []
        worker_before, cpu_before, begin = servers["honest"].tree.cpu_seconds(), coordinator_cpu(), time.monotonic()
        for i in range(args.probes):
            result = checker.probe(honest_id, (0, 4), "float32", "int8")
            if result.error is None:
                failures.append(result.problem)
            else:
                honest_errors.append(result.error)
            if i % 100 == 99:
                bl.log(f"{i + 1} honest probes, max error so far {max(honest_errors or [0]):.4g}")
        probe_seconds = time.monotonic() - begin
        probe_cpu = (coordinator_cpu() - cpu_before) / args.probes
        worker_cpu = bl.cpu_delta(worker_before, servers["honest"].tree.cpu_seconds())
        worker_cpu_per_probe = max(0.0, worker_cpu - idle_rate * probe_seconds) / args.probes

        altered_errors = []
        for _ in range(args.altered_probes):
            result = checker.probe(altered_id, (0, 4), "float32", "int8")
            if result.error is not None:
                altered_errors.append(result.error)

        loads_before = coordinator_cpu()
        for block in range(8):
            mesh.load_block(block % 4)
        load_cpu = (coordinator_cpu() - loads_before) / 8

        dial_before, begin, unreachable = coordinator_cpu(), time.monotonic(), 0
        for _ in range(args.dials):
            unreachable += not check_reachability(honest_id, [honest_peer], time.time()).reachable
        dial_cpu = (coordinator_cpu() - dial_before) / args.dials
        dial_wall = (time.monotonic() - begin) / args.dials
    finally:
        if mesh is not None:
            mesh.close()
        stops = {k: s.stop() for k, s in servers.items()}
        shutil.rmtree(work, ignore_errors=True)

    probes_per_hour = 3600 / PERIOD_S
    capacity_token_blocks = tokens_per_s * 4 * PERIOD_S
    bl.write_json(args.out, {
        "benchmark": "probe_cost",
        "machine": info,
        "loadavg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
        "int8": {
            "quantization": "petals quant_type int8 (bitsandbytes LLM.int8 Linear8bitLt, CPU backend), float32 "
                            "activations; reference: the coordinator's float32 block",
            "tolerance": tolerance,
            "honest_error": spread(honest_errors),
            "honest_probes_over_tolerance": sum(e > tolerance for e in honest_errors),
            "honest_probes_unanswered": len(failures),
            "unanswered_problems": failures[:3],
            "altered_scale": args.alter,
            "altered_error": spread(altered_errors) if altered_errors else None,
            "altered_probes_passed": sum(e <= tolerance for e in altered_errors),
            "margin_altered_min_over_honest_max": (min(altered_errors) / max(honest_errors)
                                                   if altered_errors and honest_errors else None),
        },
        "cost": {
            "probe_wall_s_mean": probe_seconds / args.probes,
            "coordinator_cpu_s_per_probe": probe_cpu,
            "coordinator_cpu_s_per_block_load": load_cpu,
            "coordinator_cpu_s_per_dial": dial_cpu,
            "dial_wall_s_mean": dial_wall,
            "dials_unreachable": unreachable,
            "coordinator_cpu_s_per_worker_hour": (probe_cpu + dial_cpu) * probes_per_hour,
            "coordinator_pct_of_one_core_per_worker": (probe_cpu + dial_cpu) * probes_per_hour / 36,
            "worker_idle_cpu_s_per_s": idle_rate,
            "worker_cpu_s_per_probe": worker_cpu_per_probe,
            "worker_cpu_share_of_period_pct": 100 * worker_cpu_per_probe / PERIOD_S,
            "worker_tokens_per_s_through_mesh": tokens_per_s,
            "probe_token_blocks": PROBE_TOKENS,
            "worker_token_blocks_per_period": capacity_token_blocks,
            "probe_share_of_served_work_pct": 100 * PROBE_TOKENS / capacity_token_blocks,
            "period_s": PERIOD_S,
        },
        "stops": stops,
    })


if __name__ == "__main__":
    main()
