"""Benchmark 7: time from a worker's restart to its READY in a live mesh (the fleet's rolling upgrade, in small).

A bootstrap peer and three `farworker run` workers serving 0:2, 2:4 and 0:4 of the tiny model (the fleet's
layout) on loopback. Each round stops one worker (SIGTERM, or SIGKILL with --kill), starts it again with the
same identity, and times the new process from start to online (READY: the DHT lists its blocks ONLINE).
Workers take turns. A restart that is not online within --ready-timeout is recorded as `stuck` with its log.

    python benchmarks/restart_to_ready.py --restarts 15 --out benchmarks/results/restart_to_ready.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from farworker.local_mesh import MeshProcessError, shared_cache_dir, start_bootstrap_peer, start_worker  # noqa: E402
from farworker.tiny_model import ensure_tiny_checkpoint  # noqa: E402

CLOSED_API = "http://127.0.0.1:9"  # nothing listens: the workers serve and retry their reports
LAYOUT = {"w1": "0:2", "w2": "2:4", "w3": "0:4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=15)
    parser.add_argument("--kill", action="store_true", help="SIGKILL the worker's process group instead of SIGTERM")
    parser.add_argument("--ready-timeout", type=float, default=150.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ensure_tiny_checkpoint(shared_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="fw-restart-"))
    boot, peers = start_bootstrap_peer(work)
    workers = {name: start_worker(work, name, CLOSED_API, peers, span) for name, span in LAYOUT.items()}
    rounds: list[dict] = []
    try:
        for handle in workers.values():
            handle.wait_online(180)
        for index in range(args.restarts):
            name = list(LAYOUT)[index % len(LAYOUT)]
            if args.kill:
                workers[name].proc.kill()
            else:
                workers[name].proc.stop(60)
            workers[name] = start_worker(work, name, CLOSED_API, peers, LAYOUT[name])
            started = time.monotonic()
            try:
                workers[name].wait_online(args.ready_timeout)
                rounds.append({"worker": name, "ready_s": round(time.monotonic() - started, 2)})
            except MeshProcessError as stuck:
                # the log tail, with this machine's home directory written as ~ (results are committed)
                rounds.append({"worker": name, "stuck": str(stuck)[-2000:].replace(str(Path.home()), "~")})
                break
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        for handle in workers.values():
            handle.proc.stop(30)
        boot.stop()
    ready = [r["ready_s"] for r in rounds if "ready_s" in r]
    result = {
        "stop": "SIGKILL" if args.kill else "SIGTERM",
        "restarts": len(rounds),
        "stuck": sum("stuck" in r for r in rounds),
        "ready_median_s": statistics.median(ready) if ready else None,
        "ready_max_s": max(ready) if ready else None,
        "over_30_s": sum(r > 30 for r in ready),
        "load_average": os.getloadavg(),
        "rounds": rounds,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
