"""Benchmark 6: the GPU run, one script that fits 10 minutes.

1. builds a checkpoint with Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008, 32 heads,
   vocab 32000) and random float16 weights, written as safetensors, one shard per layer (nothing is
   downloaded; the random numbers are drawn on the GPU);
2. serves it with one `farworker run` worker (FARLABS_ALLOW_LOCAL_MODEL=true, float16, no quantization,
   FARLABS_NUM_BLOCKS=auto): time to READY=1, the auto-chosen block count, VRAM used (NVML, per process
   and whole device), tokens/s through the mesh (client in its own process), the NVML telemetry the
   worker reports in its status file / heartbeats, with range checks (its Xid counter: a number, not None);
3. local transformers greedy generation on the same checkpoint and GPU, nothing else of ours running:
   tokens/s, overhead per token, equal tokens;
3b. cross-session step batching: one decode step of 1, 8, 32 sessions over 4 blocks, batched against one
   session at a time (benchmarks/batch_step_speed.py);
4. the NF4 path (FARLABS_QUANT_TYPE=nf4, bitsandbytes): time to READY, blocks, VRAM, tokens/s;
5. multi-GPU: one worker per visible GPU (FARLABS_GPU = its UUID, as farworker@N.service runs them), one
   client each, all generating at once: aggregate tokens/s against one instance alone (CPU mode: two CPU
   stand-ins, FARLABS_GPU=cpu, sharing the machine's cores).

Without a GPU (or with --cpu) it runs the same steps in CPU mode on a small shape, float32, so the
script is known to work; the NF4 step then checks that farworker refuses nf4 on CPU with exit 78.
Results are written as JSON to --out after every step (a step that fails is recorded, the rest go on).
A step that would not fit the remaining --budget is skipped and says so.

    python benchmarks/gpu_run.py --out gpu_run.json           # GPU if torch sees one
    python benchmarks/gpu_run.py --cpu --out cpu_dry_run.json # CPU mode, small shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

import benchlib as bl

SHAPES = {
    "gpu": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "cpu": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 688,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
    },
}
# seconds a step needs at least on the GPU (weights load, NF4 quantization); a step is skipped below that
STEP_MINIMUM = {"serve_fp16": 150, "local": 90, "batch_sizes": 60, "serve_nf4": 150, "multi_gpu": 150}


class Run:
    def __init__(self, args):
        self.args = args
        self.began = time.monotonic()
        self.result: dict = {"benchmark": "gpu_run", "machine": bl.machine_info(), "steps": {}}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.began)

    def step(self, name: str, func, *a):
        need = STEP_MINIMUM.get(name, 0) if self.mode == "gpu" else 0
        if self.left() < need:
            self.result["steps"][name] = {"skipped": f"{self.left():.0f} s of the budget left, needs ~{need} s"}
        else:
            begin = time.monotonic()
            try:
                self.result["steps"][name] = {"ok": True, **func(*a)}
            except Exception as error:
                self.result["steps"][name] = {
                    "ok": False,
                    "error": f"{type(error).__name__}: {error}"[:4000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            self.result["steps"][name]["step_seconds"] = round(time.monotonic() - begin, 1)
        bl.log(f"{name}: {json.dumps(self.result['steps'][name], default=str)[:600]}")
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.began, 1)
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.result, indent=1, default=str) + "\n")


# -- 1. checkpoint --------------------------------------------------------------------------------------
def build_checkpoint(directory: Path, shape: dict, dtype_name: str, device: str) -> dict:
    """Random Llama weights, N(0, 0.02) (output projections scaled down like GPT-2's init), norms 1."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dtype = getattr(torch, dtype_name)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, torch_dtype=dtype_name, rms_norm_eps=1e-5)
    config.save_pretrained(directory)
    h, i, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    gen = torch.Generator(device=device).manual_seed(20261127)

    def rand(*size, std=0.02):
        return torch.empty(size, dtype=dtype, device=device).normal_(0.0, std, generator=gen).cpu()

    weight_map, total = {}, 0
    shards = n + 1
    out_std = 0.02 / (2 * n) ** 0.5

    def write(tensors: dict, index: int):
        nonlocal total
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    write(
        {
            "model.embed_tokens.weight": rand(v, h),
            "model.norm.weight": torch.ones(h, dtype=dtype),
            "lm_head.weight": rand(v, h),
        },
        1,
    )
    for layer in range(n):
        p = f"model.layers.{layer}."
        write(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h, std=out_std),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i, std=out_std),
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            },
            layer + 2,
        )
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return {"bytes": total, "gib": round(total / 2**30, 2), "shards": shards, "path": str(directory)}


# -- NVML -----------------------------------------------------------------------------------------------
def nvml_used(pids: set[int]) -> dict:
    """Device memory used (whole GPU 0) and by the given processes, from NVML; {} without a driver."""
    from farworker import gpu

    nvml = gpu._nvml()
    if nvml is None:
        return {}
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    out = {"device_used_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).used)}
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        out["tree_used_bytes"] = int(sum(p.usedGpuMemory or 0 for p in procs if p.pid in pids))
        out["tree_pids_on_gpu"] = sorted(p.pid for p in procs if p.pid in pids)
    except nvml.NVMLError as error:
        out["per_process"] = f"unavailable: {error}"
    return out


def telemetry_checks(readings: list[dict]) -> list[str]:
    """Problems with NVML readings; [] means sane."""
    problems = []
    for r in readings:

        def bad(name, ok, r=r):
            if r.get(name) is not None and not ok(r[name]):
                problems.append(f"gpu {r.get('index')}: {name}={r[name]!r}")

        bad("utilization_pct", lambda x: 0 <= x <= 100)
        bad("temperature_c", lambda x: 5 <= x <= 110)
        bad("power_w", lambda x: 0 < x < 2000)
        bad("sm_clock_mhz", lambda x: 0 < x < 5000)
        bad("ecc_volatile_uncorrected", lambda x: x == 0)
        if not 0 < r.get("memory_used_bytes", 0) <= r.get("memory_total_bytes", 0):
            problems.append(f"gpu {r.get('index')}: memory used/total inconsistent")
    return problems


def xid_checks(worker_gpus: list[dict] | None) -> list[str]:
    """Problems with the worker's Xid counter, from its status file: on a GPU that reports Xid events the
    count is a number (0 unless something went wrong) from the start, never None."""
    problems = []
    for r in worker_gpus or []:
        count = r.get("xid_errors")
        if count is None:
            problems.append(f"gpu {r.get('index')}: xid_errors=None (counter not started, or no Xid events here)")
        elif count:
            problems.append(f"gpu {r.get('index')}: {count} Xid errors, last Xid {r.get('xid_last')}")
    return problems


class UtilSampler:
    """NVML utilization at 10 Hz while a generation runs."""

    def __init__(self):
        from farworker import gpu

        self.gpu, self.samples, self._stop = gpu, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            for r in self.gpu.telemetry():
                self.samples.append(r.get("utilization_pct"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


# -- 2./4. serving --------------------------------------------------------------------------------------
def serve_and_measure(run: Run, quant: str) -> dict:
    from farworker import gpu
    from farworker.catalog import dht_prefix_for
    from farworker.status_file import read_status

    args, work, model = run.args, run.work, run.model_dir
    env = {
        "FARLABS_ALLOW_LOCAL_MODEL": "true",
        "FARLABS_MODEL_NAME": str(model),
        "FARLABS_QUANT_TYPE": quant,
        "FARLABS_TORCH_DTYPE": run.dtype,
        "FARLABS_DEVICE": "cuda" if run.mode == "gpu" else "cpu",
        # our own throughput cache: the first start measures (counted in its READY time), the NF4 start reuses
        # nothing (another key); the shared cache in ~/.cache/farworker is left alone
        "FARLABS_CACHE_DIR": str(work / "cache"),
    }
    before = nvml_used(set())
    server = client = None
    out: dict = {"quant_type": quant}
    try:
        with bl.coordinator(work) as coord:
            server = bl.start_farworker(work, f"worker-{quant}", coord.url, model=str(model), extra_env=env)
            if quant == "nf4" and run.mode == "cpu":  # farworker must refuse: nf4 needs CUDA (exit 78)
                code = server.proc.wait(120)
                refused = [line for line in server.log_text().splitlines() if "config error" in line]
                return {
                    "expected": "exit 78 (nf4 needs CUDA)",
                    "exit_code": code,
                    "message": refused[:2],
                    "passed": code == 78 and bool(refused),
                }
            out["ready_s"] = round(server.wait_ready(timeout=max(60.0, run.left() - 60)), 2)
            state_dir = server.log_path.parent / f"worker-{quant}" / "state"
            deadline, status = time.monotonic() + 15, {}
            while time.monotonic() < deadline and not status.get("blocks"):  # written just after READY
                status = read_status(state_dir) or {}
                time.sleep(0.2)
            out["blocks"] = status.get("blocks")
            plans = [line.split("] ", 1)[-1] for line in server.log_text().splitlines() if "Serving " in line]
            out["plan_log_line"] = plans[0] if plans else None
            out["vram_after_ready"] = nvml_used(server.tree.seen | {p.pid for p in server.tree.processes()})
            if before.get("device_used_bytes") is not None:
                out["vram_device_delta_gib"] = round(
                    (out["vram_after_ready"]["device_used_bytes"] - before["device_used_bytes"]) / 2**30, 2
                )
            if out["vram_after_ready"].get("tree_used_bytes") and out["blocks"]:
                used = out["vram_after_ready"]["tree_used_bytes"]
                count = out["blocks"][1] - out["blocks"][0]
                out["vram_tree_gib"] = round(used / 2**30, 2)
                out["vram_gib_per_block"] = round(used / 2**30 / count, 3)
            out["worker_status_gpus"] = status.get("gpus")  # what heartbeats carry
            out["xid_problems"] = xid_checks(status.get("gpus"))
            out["predicted_gib_per_block"] = predicted_per_block(model, run.dtype, quant)
            prefix = dht_prefix_for(str(model))  # what the worker announces under
            client = bl.MeshClientProcess(
                work,
                f"client-{quant}",
                server.initial_peer,
                model,
                "passive",
                dht_prefix=prefix or Path(model).name,
                device="cuda" if run.mode == "gpu" else "cpu",
                dtype=run.dtype,
            )
            client.generate(bl.PROMPT_IDS, args.new_tokens, timeout=300)  # warm-up
            seconds, tokens = [], None
            with UtilSampler() as util:
                for _ in range(args.reps):
                    answer = client.generate(bl.PROMPT_IDS, args.new_tokens, timeout=300)
                    seconds.append(answer["seconds"])
                    tokens = answer["tokens"]
            out["seconds_per_generation"] = [round(s, 4) for s in seconds]
            out["tokens_per_s"] = round(args.new_tokens / bl.median(seconds), 2)
            out["tokens"] = tokens
            out["gpu_util_pct_max_while_generating"] = max((u for u in util.samples if u is not None), default=None)
            out["vram_after_generation"] = nvml_used(server.tree.seen | {p.pid for p in server.tree.processes()})
            readings = gpu.telemetry()
            out["nvml_telemetry"] = readings
            out["nvml_problems"] = telemetry_checks(readings) if readings else ["no NVML (no GPU driver)"]
            out["peak_rss_sum_mib"] = round(server.tree.peak_rss / 2**20, 1)
            return out
    finally:
        if client is not None:
            client.close()
        if server is not None:
            out["stop"] = server.stop(timeout=60)


def predicted_per_block(model: Path, dtype: str, quant: str) -> float | str:
    """What farworker's block plan budgets per block (weights + attention cache), GiB."""
    try:
        import torch

        from farworker.block_plan import per_block_bytes
        from farworker.petals.compat import import_petals

        import_petals()
        from petals.utils.auto_config import AutoDistributedConfig

        config = AutoDistributedConfig.from_pretrained(str(model))
        return round(per_block_bytes(config, getattr(torch, dtype), quant) / 2**30, 3)
    except Exception as error:  # a figure for the report, never a reason to fail the step
        return f"unavailable: {error}"


def local_measure(run: Run) -> dict:
    device = "cuda" if run.mode == "gpu" else "cpu"
    # a lone process on a GPU host: torch's default threads; CPU mode shares 2 cores: one thread (see mesh_vs_local)
    answer = bl.run_local(
        run.model_dir,
        "default" if run.mode == "gpu" else "single",
        run.args.new_tokens,
        run.args.reps,
        device=device,
        dtype=run.dtype,
        timeout=max(60, int(run.left())),
    )
    tps = run.args.new_tokens / bl.median(answer["seconds"])
    out = {
        "tokens_per_s": round(tps, 2),
        "seconds_per_generation": [round(s, 4) for s in answer["seconds"]],
        "tokens": answer["tokens"],
    }
    mesh = run.result["steps"].get("serve_fp16", {})
    if mesh.get("tokens_per_s"):
        out["mesh_over_local"] = round(mesh["tokens_per_s"] / tps, 4)
        out["mesh_overhead_ms_per_token"] = round(1000 / mesh["tokens_per_s"] - 1000 / tps, 3)
        out["same_tokens_as_mesh"] = mesh.get("tokens") == answer["tokens"]
    return out


# -- 3b. cross-session step batching --------------------------------------------------------------------
def batch_sizes_measure(run: Run) -> dict:
    """A decode step of 1, 8 and 32 sessions over 4 of the checkpoint's blocks: batched as the worker runs them
    (farworker/petals/step_batching.py) against one session at a time (benchmarks/batch_step_speed.py)."""
    from batch_step_speed import measure

    device = "cuda" if run.mode == "gpu" else "cpu"
    return measure(str(run.model_dir), device, run.dtype, (1, 8, 32), num_blocks=4, past=512,
                   steps=10 if run.mode == "gpu" else 3)


# -- 5. multi-GPU ---------------------------------------------------------------------------------------
def multi_gpu_measure(run: Run) -> dict:
    """One worker per visible GPU, each pinned by UUID and holding every block it fits, each with its own client
    (embeddings and head on the same GPU); first instance 0 alone, then all clients at once."""
    from farworker import gpu
    from farworker.catalog import dht_prefix_for
    from farworker.status_file import read_status

    args, work, model = run.args, run.work, run.model_dir
    pinned = [g.uuid for g in gpu.list_gpus()] if run.mode == "gpu" else ["cpu", "cpu"]
    device = "cuda" if run.mode == "gpu" else "cpu"
    out: dict = {"instances": len(pinned), "pinned": pinned}
    servers, clients = [], []
    try:
        with bl.coordinator(work) as coord:
            for index, uuid in enumerate(pinned):
                env = {"FARLABS_ALLOW_LOCAL_MODEL": "true", "FARLABS_MODEL_NAME": str(model),
                       "FARLABS_QUANT_TYPE": "none", "FARLABS_TORCH_DTYPE": run.dtype, "FARLABS_DEVICE": device,
                       "FARLABS_GPU": uuid, "FARLABS_CACHE_DIR": str(work / "cache")}
                servers.append(bl.start_farworker(work, f"multi-{index}", coord.url, model=str(model), extra_env=env))
            out["ready_s"] = [round(s.wait_ready(timeout=max(60.0, run.left() - 60)), 2) for s in servers]
            prefix = dht_prefix_for(str(model)) or Path(model).name
            for index, (server, uuid) in enumerate(zip(servers, pinned, strict=True)):
                clients.append(bl.MeshClientProcess(
                    work, f"multi-client-{index}", server.initial_peer, model, "passive", dht_prefix=prefix,
                    device=device, dtype=run.dtype,
                    extra_env={"CUDA_VISIBLE_DEVICES": uuid} if run.mode == "gpu" else None))
            for client in clients:
                client.generate(bl.PROMPT_IDS, args.new_tokens, timeout=300)  # warm-up
            alone = [clients[0].generate(bl.PROMPT_IDS, args.new_tokens, timeout=300)["seconds"]
                     for _ in range(args.reps)]
            rounds, tokens = [], set()
            for _ in range(args.reps):
                answers: list = [None] * len(clients)

                def generate(i, answers=answers):
                    answers[i] = clients[i].generate(bl.PROMPT_IDS, args.new_tokens, timeout=300)

                threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(clients))]
                began = time.monotonic()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(330)
                rounds.append(time.monotonic() - began)
                tokens |= {json.dumps(a["tokens"]) if a else "missing" for a in answers}
            one = args.new_tokens / bl.median(alone)
            aggregate = len(clients) * args.new_tokens / bl.median(rounds)
            out.update({
                "one_instance_tokens_per_s": round(one, 2),
                "aggregate_tokens_per_s": round(aggregate, 2),
                "aggregate_over_one_instance": round(aggregate / one, 3),
                "seconds_per_round": [round(r, 4) for r in rounds],
                "same_tokens_on_every_instance": len(tokens) == 1 and "missing" not in tokens,
                # each worker reports its own GPU only (NVML lists them all): the pinning as heartbeats show it
                "gpus_each_worker_reports": [[g.get("uuid") for g in (read_status(work / f"multi-{i}" / "state")
                                                                      or {}).get("gpus") or []]
                                             for i in range(len(servers))],
            })
            return out
    finally:
        for client in clients:
            client.close()
        out["stop"] = [server.stop(timeout=60) for server in servers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU mode (small shape) even if a GPU is present")
    parser.add_argument("--out", default=None, help="JSON results (written after every step)")
    parser.add_argument("--work-dir", default=None, help="checkpoint and logs (default: temporary, removed)")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds the whole run may take")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (tests)")
    args = parser.parse_args()

    run = Run(args)
    import torch

    run.mode = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    run.dtype = "float16" if run.mode == "gpu" else "float32"
    shape = dict(SHAPES[run.mode])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    from farworker import gpu

    driver = gpu.driver_info()
    run.result.update(
        {
            "mode": run.mode,
            "shape": shape,
            "dtype": run.dtype,
            "gpus": [g.__dict__ for g in gpu.list_gpus()],
            "driver": driver.__dict__ if driver else None,
            "torch_cuda": torch.version.cuda,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
        }
    )
    run.work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-gpu-run-"))
    run.work.mkdir(parents=True, exist_ok=True)
    run.model_dir = run.work / "llama-7b-shape-random"
    try:
        run.step(
            "checkpoint",
            lambda: build_checkpoint(run.model_dir, shape, run.dtype, "cuda" if run.mode == "gpu" else "cpu"),
        )
        if run.result["steps"]["checkpoint"].get("ok"):
            run.step("serve_fp16", serve_and_measure, run, "none")
            run.step("local", local_measure, run)
            run.step("batch_sizes", batch_sizes_measure, run)
            run.step("serve_nf4", serve_and_measure, run, "nf4")
            run.step("multi_gpu", multi_gpu_measure, run)
    finally:
        if not args.work_dir:
            shutil.rmtree(run.work, ignore_errors=True)
        run.save()
    print(json.dumps(run.result, indent=1, default=str))


if __name__ == "__main__":
    main()
