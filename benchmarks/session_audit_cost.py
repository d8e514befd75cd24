"""Benchmark 12: session audits (issue 18): what petals' server-to-server push is worth to the coordinator's
completions, what auditing a whole server session costs against what serving it cost the worker, and how many
audits are dropped at 8 concurrent clients.

A bootstrap peer and two real `farworker run` workers splitting the tiny Llama (0:2, 2:4, float32, CPU); the
coordinator's own generation client (farworker/mesh_client.py) in this process.

1. Push: --rounds rounds, each one greedy completion (8-token prompt, --new-tokens new) with push (petals'
   default client, use_server_to_server) and one without (the coordinator's), alternating which goes first.
2. Audit cost: --audited completions without push, every server session captured step by step
   (SessionCapture) and audited (coordinator/services/audit.audit_session, float32 reference blocks in this
   process, one pass over the session). Audit CPU seconds (the auditing thread) against the CPU seconds the
   serving worker's process tree spent in that completion.
3. Drops: 8 client threads, --concurrent completions each, through SessionAudits (one audit at a time, 4 queued)
   at --audit-share (default 0.05) and at share 1.0.

With --int8-sessions N instead: one honest `farworker run` with int8 weights (petals' LLM.int8 on CPU) holding all
4 blocks in its own swarm; N greedy completions (random prompts of 4 to 39 tokens, 8 new tokens), every session
audited against the float32 reference: the worst position's error per session against int8's span tolerance.

    cd benchmarks && python session_audit_cost.py --out results/session_audit_cost.json
    cd benchmarks && python session_audit_cost.py --int8-sessions 1000 --out results/session_audit_int8.json
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import benchlib as bl


class EverySession:
    """Stands where the coordinator's SessionAudits stands for the mesh client: captures every server session."""

    def __init__(self):
        from farworker.session_capture import CaptureBudget

        self.budget, self.items = CaptureBudget(2**34), []

    def watch(self, peer_id, span, session_id):
        from farworker.session_capture import SessionCapture

        return SessionCapture(peer_id, span, session_id, self.budget)

    def submit(self, captures) -> None:
        self.items.extend(captures)


class AnyWorker:
    """The store as SessionAudits reads it: every peer a registered float32 worker, none quarantined."""

    def worker_by_peer(self, peer_id):
        return peer_id

    def worker_row(self, worker_id):
        return {"torch_dtype": "float32", "quant_type": "none"}

    def quarantine_of(self, worker_id):
        return None


def timed_completion(client, rng, new_tokens: int, **kwargs) -> float:
    prompt = [rng.randrange(3, 500) for _ in range(8)]
    begin = time.monotonic()
    client.generate(prompt, new_tokens, 0.0, **kwargs)
    return time.monotonic() - begin


def push_worth(model, peers, prefix, rounds: int, new_tokens: int) -> dict:
    from farworker.mesh_client import MeshClient

    clients = {"push": MeshClient(model, peers, prefix), "no_push": MeshClient(model, peers, prefix,
                                                                             use_server_to_server=False)}
    walls = {name: [] for name in clients}
    try:
        rng = random.Random(5)
        for client in clients.values():
            timed_completion(client, rng, 2)  # warm-up: connections, lazy imports
        for n in range(rounds):
            for name in (["push", "no_push"] if n % 2 == 0 else ["no_push", "push"]):
                walls[name].append(timed_completion(clients[name], rng, new_tokens))
    finally:
        for client in clients.values():
            client.close()
    return {name: {"completions": rounds, "new_tokens": new_tokens, "tokens_per_s": rounds * new_tokens / sum(w),
                   "median_wall_s": bl.median(w)} for name, w in walls.items()}


def audit_cost(model, peers, prefix, workers, completions: int, new_tokens: int) -> dict:
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.coordinator.services.audit import audit_session
    from farworker.coordinator.spot_check import SpotChecker, span_tolerance

    client = MeshClient(model, peers, prefix, use_server_to_server=False)
    trees = {w.status()["peer_id"]: bl.Tree(w.proc.process) for w in workers}
    reference = SpotChecker(client).reference_output
    audits, rng = EverySession(), random.Random(6)
    rows = []
    try:
        timed_completion(client, rng, 2)
        reference((0, 4), __import__("torch").zeros(1, 2, client.model_config().hidden_size))  # lazy imports
        for _ in range(completions):
            before = {peer: tree.cpu_seconds() for peer, tree in trees.items()}
            wall = timed_completion(client, rng, new_tokens, audits=audits)
            time.sleep(0.3)  # the workers' bookkeeping after the session (usage records) belongs to it too
            served = {peer: bl.cpu_delta(before[peer], tree.cpu_seconds()) for peer, tree in trees.items()}
            for capture in audits.items:
                result = audit_session(capture, reference, span_tolerance("float32", "none", 2))
                rows.append({"positions": result.positions, "audit_cpu_s": result.cpu_s, "error": result.error,
                             "passed": result.passed, "worker_cpu_s": served[capture.peer_id],
                             "completion_wall_s": wall})
                capture.release()
            audits.items.clear()
    finally:
        client.close()
        for tree in trees.values():
            tree.close()
    audit_cpu = sum(r["audit_cpu_s"] for r in rows) / len(rows)
    worker_cpu = sum(r["worker_cpu_s"] for r in rows) / len(rows)
    return {"sessions": len(rows), "positions_per_session": rows[0]["positions"],
            "failed": sum(not r["passed"] for r in rows), "max_error": max(r["error"] for r in rows),
            "audit_cpu_s_per_session": audit_cpu, "worker_cpu_s_per_session": worker_cpu,
            "audit_over_worker_cpu": audit_cpu / worker_cpu,
            "completion_wall_s_mean": sum(r["completion_wall_s"] for r in rows) / len(rows)}


def drops(model, peers, prefix, share: float, per_client: int, new_tokens: int) -> dict:
    from prometheus_client import CollectorRegistry

    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.coordinator.services.audit import AuditSampler, SessionAudits
    from farworker.coordinator.spot_check import SpotChecker

    client = MeshClient(model, peers, prefix, use_server_to_server=False)
    client.warm()
    audits = SessionAudits(SpotChecker(client), AnyWorker(), AuditSampler(share), registry=CollectorRegistry())
    audits.start()

    def one_client(seed: int):
        rng = random.Random(seed)
        for _ in range(per_client):
            timed_completion(client, rng, new_tokens, audits=audits)

    try:
        threads = [threading.Thread(target=one_client, args=(seed,)) for seed in range(8)]
        begin = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        wall = time.monotonic() - begin
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not audits._queue.empty():
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        audits.stop()
        client.close()
    counts = dict(audits.counts)
    settled = counts["passed"] + counts["failed"] + counts["dropped"] + counts["dropped_memory"]
    return {"share": share, "clients": 8, "completions": 8 * per_client, "wall_s": wall, **counts,
            "dropped_share": (counts["dropped"] + counts["dropped_memory"]) / max(1, counts["chosen"]),
            "settled": settled, "audit_cpu_s": audits.cpu_s}


def int8_sessions(sessions: int) -> dict:
    from farworker.catalog import dht_prefix_for
    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.coordinator.services.audit import audit_session
    from farworker.coordinator.spot_check import SpotChecker, span_tolerance

    work = Path(tempfile.mkdtemp(prefix="fw-bench-audit-int8-"))
    server = bl.start_farworker(work, "int8", "http://127.0.0.1:9", extra_env={"FARLABS_QUANT_TYPE": "int8"})
    client = None
    try:
        server.wait_ready()
        model = bl.tiny_model_dir()
        client = MeshClient(model, [server.initial_peer], dht_prefix_for(model.name), use_server_to_server=False)
        reference, audits, rng = SpotChecker(client).reference_output, EverySession(), random.Random(8)
        tolerance = span_tolerance("float32", "int8", 4)
        errors, positions, worst_at = [], [], []
        for _ in range(sessions):
            prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))]
            client.generate(prompt, 8, 0.0, audits=audits)
            for capture in audits.items:
                result = audit_session(capture, reference, tolerance)
                errors.append(result.error)
                positions.append(result.positions)
                worst_at.append(result.worst_position >= len(prompt))
                capture.release()
            audits.items.clear()
    finally:
        if client is not None:
            client.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    ordered = sorted(errors)
    return {"sessions": len(errors), "span_blocks": 4, "tolerance": tolerance,
            "over_tolerance": sum(e > tolerance for e in errors),
            "error": {"min": ordered[0], "median": ordered[len(ordered) // 2],
                      "p99": ordered[int(0.99 * (len(ordered) - 1))], "max": ordered[-1]},
            "worst_position_in_decode_share": sum(worst_at) / len(worst_at),
            "positions": {"min": min(positions), "max": max(positions)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--audited", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=5, help="completions per client thread")
    parser.add_argument("--audit-share", type=float, default=0.05)
    parser.add_argument("--int8-sessions", type=int, default=0, help="run only the honest int8 audit series")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.int8_sessions:
        result = int8_sessions(args.int8_sessions)
        bl.log(f"int8: {result}")
        bl.write_json(args.out, {"benchmark": "session_audit_int8", "machine": bl.machine_info(),
                                 "loadavg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
                                 "int8": result})
        return
    from farworker.catalog import dht_prefix_for
    from farworker.local_mesh import start_bootstrap_peer, start_worker

    info, model = bl.machine_info(), bl.tiny_model_dir()
    prefix = dht_prefix_for(model.name)
    work = Path(tempfile.mkdtemp(prefix="fw-bench-audit-"))
    peer, peers = start_bootstrap_peer(work)
    workers = []
    try:
        for name, span in (("first", "0:2"), ("second", "2:4")):
            workers.append(start_worker(work, name, "http://127.0.0.1:9", peers, span))
        for worker in workers:
            worker.wait_online(timeout=180)
        push = push_worth(model, peers, prefix, args.rounds, args.new_tokens)
        bl.log(f"push: {push}")
        cost = audit_cost(model, peers, prefix, workers, args.audited, args.new_tokens)
        bl.log(f"audit cost: {cost}")
        dropped = [drops(model, peers, prefix, share, args.concurrent, args.new_tokens)
                   for share in (args.audit_share, 1.0)]
        bl.log(f"drops: {dropped}")
    finally:
        for worker in workers:
            worker.proc.stop(timeout=20)
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    bl.write_json(args.out, {"benchmark": "session_audit_cost", "machine": info,
                             "loadavg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
                             "push": push, "audit_cost": cost, "drops": dropped})


if __name__ == "__main__":
    main()
