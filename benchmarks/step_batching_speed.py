"""Benchmark 10: concurrent petals sessions on one worker, with cross-session step batching and without.

Variants, all serving every block of the tiny Llama (float32, CPU) in their own new swarm on loopback, all up
for the whole run: `farworker:on` (`farworker run`, FARLABS_STEP_BATCHING=true, the default), `farworker:off`
(the same with batching off: the ablation) and `petals` (petals' own run_server CLI: raw petals). Each has its
own client process (this script with --client) that opens N inference sessions of petals' own client at once,
one thread each, and generates greedily one step per token. Per level N (1, 2, 4, 8, 16) and round, the
variants run one after another in an order that rotates, so drift on a shared machine falls on all.

Figures per variant and level: aggregate tokens/s (all sessions' decode tokens / wall time from the first step
to the last token) and the p50/p99 of the per-token latency (time between a session's consecutive tokens).

    python benchmarks/step_batching_speed.py --rounds 3 --new-tokens 32 --out benchmarks/results/step_batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib as bl

VARIANTS = ("farworker:on", "farworker:off", "petals")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent sessions, comma list")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each session generates")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--client", default=None, metavar="PEER", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client(args)
    levels = [int(level) for level in args.levels.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"--variants: unknown {bad}; expected some of {', '.join(VARIANTS)}")

    info = bl.machine_info()
    model = bl.tiny_model_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fw-bench-batching-"))
    servers, clients = {}, {}
    try:
        with bl.coordinator(work) as coord:
            for variant in variants:
                if variant == "petals":
                    servers[variant] = bl.start_raw_petals(work, "petals", model)
                else:
                    batching = "true" if variant.endswith(":on") else "false"
                    servers[variant] = bl.start_farworker(work, variant.replace(":", "-"), coord.url,
                                                          extra_env={"FARLABS_STEP_BATCHING": batching})
            for variant, server in servers.items():
                server.wait_ready()
                policy = "default" if variant == "petals" else "single"  # each client as its server's side
                clients[variant] = SessionsClient(work, variant, server.initial_peer, model, policy)
                clients[variant].run(1, 4)  # warm-up: routes, first-call costs
            runs = []
            for round_index in range(args.rounds):
                for level in levels:
                    order = variants[round_index % len(variants):] + variants[:round_index % len(variants)]
                    for variant in order:
                        result = clients[variant].run(level, args.new_tokens)
                        runs.append({"round": round_index, "level": level, "variant": variant, **result})
                        bl.log(f"round {round_index} level {level:2d} {variant:14s} {result['tokens_per_s']:7.1f} tok/s"
                               f"  p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms")
            batched_calls = {v: largest_batch(servers[v].log_text()) for v in servers if v.startswith("farworker")}
    finally:
        for each in clients.values():
            each.close()
        for server in servers.values():
            server.stop()
    summary = summarize(runs, levels, variants)
    result = {"machine": info, "new_tokens": args.new_tokens, "rounds": args.rounds, "summary": summary,
              "largest_batch_logged": batched_calls, "runs": runs}
    print(json.dumps(summary, indent=1))
    bl.write_json(args.out, result)


def largest_batch(log_text: str) -> int:
    """The most sessions a worker ran in one call, from its log (step_batching logs each new maximum)."""
    import re

    found = [int(n) for n in re.findall(r"Step batching: ran (\d+) sessions' steps in one call", log_text)]
    return max(found, default=1)


def summarize(runs: list[dict], levels: list[int], variants: list[str]) -> dict:
    """Per level: each variant's median tokens/s and median p50/p99 over rounds; ratios to raw petals and to off."""
    summary = {}
    for level in levels:
        row = {}
        for variant in variants:
            mine = [run for run in runs if run["level"] == level and run["variant"] == variant]
            row[variant] = {key: round(statistics.median(run[key] for run in mine), 2)
                            for key in ("tokens_per_s", "p50_ms", "p99_ms")}
        for base in ("petals", "farworker:off"):
            if "farworker:on" in row and base in row:
                row[f"on/{base}"] = round(row["farworker:on"]["tokens_per_s"] / row[base]["tokens_per_s"], 2)
        summary[str(level)] = row
    if "1" in summary and "8" in summary and "farworker:on" in variants:
        summary["on: 8 / 1"] = round(summary["8"]["farworker:on"]["tokens_per_s"]
                                     / summary["1"]["farworker:on"]["tokens_per_s"], 2)
    return summary


class SessionsClient:
    """This script in --client mode, in its own process: runs N concurrent sessions per request."""

    def __init__(self, work: Path, name: str, peer: str, model: Path, policy: str):
        import subprocess

        self.name = name
        self.log_path = work / f"client-{name.replace(':', '-')}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the client process
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", peer, "--model", str(model), "--policy", policy],
            env=bl.clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            cwd=str(work), start_new_session=True)
        self._read(180)

    def _read(self, timeout: float) -> dict:
        box: dict = {}
        reader = threading.Thread(target=lambda: box.update(json.loads(self.proc.stdout.readline() or "{}")),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive() or "error" in box or not box:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"client {self.name}: {box.get('error', 'no answer')}\n{tail}")
        return box

    def run(self, sessions: int, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"sessions": sessions, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read(600)

    def close(self) -> None:
        import subprocess

        try:
            self.proc.stdin.close()
            self.proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def client(args) -> None:
    """--client mode: one petals client; for each request, N sessions at once; prints one JSON line each."""
    if args.policy != "default":
        from farworker.threading_policy import apply_thread_policy

        apply_thread_policy(args.policy)
    from farworker.petals.compat import import_petals

    petals = import_petals()
    import torch
    from petals.client.inference_session import InferenceSession

    model = petals.AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=[args.client], dht_prefix="farworker-tiny-llama", torch_dtype=torch.float32)
    embed = model.get_input_embeddings()
    print(json.dumps({"ready": True}), flush=True)

    def generate(index: int, new_tokens: int, stamps: list[float]) -> None:
        prompt = bl.PROMPT_IDS[: 4 + index % 5]  # different lengths: sessions at different positions
        with torch.inference_mode(), InferenceSession(model.transformer.h.sequence_manager,
                                                      max_length=len(prompt) + new_tokens) as session:
            hidden = session.step(embed(torch.tensor([prompt])))
            for produced in range(new_tokens):
                token = model.lm_head(model.model.norm(hidden[:, -1:])).argmax(-1)
                stamps.append(time.perf_counter())
                if produced + 1 < new_tokens:
                    hidden = session.step(embed(token))

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        stamps: list[list[float]] = [[] for _ in range(request["sessions"])]
        errors: list[str] = []

        def run(index: int, stamps=stamps, request=request, errors=errors) -> None:
            try:
                generate(index, request["new_tokens"], stamps[index])
            except Exception as error:  # reported in the answer
                errors.append(repr(error))

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(request["sessions"])]
        begin = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        if errors or any(thread.is_alive() for thread in threads):
            print(json.dumps({"error": errors[:3] or ["a session did not finish in 600 s"]}), flush=True)
            continue
        end = max(s[-1] for s in stamps)
        intervals = sorted(1000 * (b - a) for s in stamps for a, b in zip(s, s[1:], strict=False))
        decode_tokens = sum(len(s) for s in stamps)
        print(json.dumps({
            "sessions": request["sessions"], "tokens": decode_tokens, "seconds": round(end - begin, 4),
            "tokens_per_s": round(decode_tokens / (end - begin), 2),
            "p50_ms": round(intervals[len(intervals) // 2], 2) if intervals else None,
            "p99_ms": round(intervals[min(len(intervals) - 1, int(0.99 * len(intervals)))], 2) if intervals else None,
        }), flush=True)
    model.transformer.h.sequence_manager.shutdown()


if __name__ == "__main__":
    main()
