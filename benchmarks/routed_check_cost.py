"""Benchmark 11: routed spot checks on int8 workers: their error over a whole span, and what a check costs.

Two real `farworker run` workers, each alone in its own swarm, hold every block of the tiny Llama with int8
weights: an honest one, and one whose MLP output projections are scaled by --alter. For each, the coordinator's
own mesh client generates --completions greedy completions (random prompts of 4 to 39 tokens, 8 new tokens) with
its routed-check capture on (petals_compat.on_first_steps, as for a sampled request), and its SpotChecker
verifies each capture exactly as RoutedChecks does (the 4-block span recomputed block by block in float32).

Reported side by side: the honest and altered errors against the span tolerance (int8 x sqrt(4)); the
coordinator's CPU seconds per verification against the wall time of the completion it checks; and so the share
of the coordinator's CPU that checking every routed request, or the default 5 %, would take.

    python benchmarks/routed_check_cost.py --completions 100 --out benchmarks/results/routed_check_cost.json
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import benchlib as bl
from probe_cost import CLOSED_API, altered_copy, spread


class Captures:
    """Stands where the coordinator's RoutedChecks stands for the mesh client: samples every request."""

    def __init__(self):
        self.items = []

    def sample(self) -> bool:
        return True

    def submit(self, capture) -> None:
        self.items.append(capture)


def run_worker(work: Path, name: str, served: str, env: dict, completions: int, seed: int) -> dict:
    from farworker.catalog import dht_prefix_for
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.coordinator.settings import DEFAULT_SAMPLE_ROUTED
    from farworker.coordinator.spot_check import SpotChecker

    server = bl.start_farworker(work, name, CLOSED_API, model=served, extra_env=env)
    mesh = None
    try:
        server.wait_ready()
        reference = bl.tiny_model_dir()  # the coordinator's own copy: float32, unaltered
        mesh = MeshClient(reference, [server.initial_peer], dht_prefix_for(reference.name))
        mesh.warm()
        checker, captures = SpotChecker(mesh), Captures()
        mesh.generate(bl.PROMPT_IDS, 2, 0.0)  # warm-up: connections, lazy imports
        checker.reference_output((0, 4), __import__("torch").zeros(1, 2, mesh.model_config().hidden_size))
        rng = random.Random(seed)
        errors, tolerance, check_cpu, generate_wall = [], None, [], []
        for _ in range(completions):
            prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))]
            begin = time.monotonic()
            mesh.generate(prompt, 8, 0.0, first_steps=captures)
            generate_wall.append(time.monotonic() - begin)
            capture = captures.items.pop()
            cpu = time.process_time()
            result = checker.verify_routed(capture, "float32", "int8")
            check_cpu.append(time.process_time() - cpu)
            errors.append(result.error)
            tolerance = result.tolerance
        cpu_per_check, wall_per_completion = sum(check_cpu) / len(check_cpu), sum(generate_wall) / len(generate_wall)
        return {
            "error": spread(errors),
            "tolerance": tolerance,
            "checks_over_tolerance": sum(e > tolerance for e in errors),
            "coordinator_cpu_s_per_check": cpu_per_check,
            "completion_wall_s_mean": wall_per_completion,
            "check_cpu_over_completion_wall": cpu_per_check / wall_per_completion,
            "at_default_share_pct_of_one_core_per_busy_session": 100 * DEFAULT_SAMPLE_ROUTED * cpu_per_check
            / wall_per_completion,
        }
    finally:
        if mesh is not None:
            mesh.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=100, help="routed completions checked per worker")
    parser.add_argument("--alter", type=float, default=1.2, help="scale of the altered worker's MLP output projections")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(tempfile.mkdtemp(prefix="fw-bench-routed-"))
    int8 = {"FARLABS_QUANT_TYPE": "int8"}
    try:
        honest = run_worker(work, "honest", model.name, int8, args.completions, seed=1)
        bl.log(f"honest: {honest}")
        altered_model = altered_copy(model, work / "altered", args.alter)
        altered = run_worker(work, "altered", str(altered_model), {**int8, "FARLABS_ALLOW_LOCAL_MODEL": "true"},
                             args.completions, seed=2)
        bl.log(f"altered: {altered}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bl.write_json(args.out, {
        "benchmark": "routed_check_cost",
        "machine": info,
        "loadavg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
        "span_blocks": 4,
        "quantization": "petals quant_type int8 (bitsandbytes LLM.int8, CPU), float32 activations and reference",
        "honest": honest,
        "altered_scale": args.alter,
        "altered": altered,
        "margin_altered_min_over_honest_max": altered["error"]["min"] / honest["error"]["max"],
    })


if __name__ == "__main__":
    main()
