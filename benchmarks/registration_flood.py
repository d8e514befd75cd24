"""Benchmark 14: GET /v1/workers p99 before and during a registration flood (issue 22).

A real `farworker coordinator` process on loopback (no mesh). 20 workers register from 127.0.0.1 first (the
mesh's own). Then a flooding party sends FLOOD signed registrations, each with a fresh RSA key, from another
loopback source (127.0.0.2), 8 at a time from a process of its own, while this process times GET /v1/workers
(the default page) one request after the other. Twice: with the coordinator's defaults (30 registrations a
minute per source, 256 unproven workers), and with the protections off (`--registration-rate none`, a bound
nobody reaches): the coordinator of issue 22's report. The flooder makes its keys before the clock starts
(1024-bit: the coordinator takes any RSA key, and key making was the flood's own limit).

    python benchmarks/registration_flood.py --flood 2000 --out benchmarks/results/registration_flood.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl
import requests

sys.path.insert(0, str(bl.ROOT / "tests"))  # the flooding party the tests use (tests/flood_client.py)
from flood_client import FLOOD_SOURCE, fresh_identities, register_all  # noqa: E402

HONEST = 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies: list[float]) -> dict:
    return {"n": len(latencies), "p50_ms": round(statistics.median(latencies) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2), "max_ms": round(max(latencies) * 1e3, 2)}


def time_gets(url: str, until, least: int, most: int) -> tuple[list[float], int]:
    """GET /v1/workers one after the other until ``until()`` (at least ``least``, at most ``most`` times)."""
    latencies, size = [], 0
    with requests.Session() as session:
        for i in range(most):
            if i >= least and until():
                break
            started = time.perf_counter()
            answer = session.get(url + "/v1/workers", timeout=60)
            latencies.append(time.perf_counter() - started)
            size = len(answer.content)
    return latencies, size


def flood_process(url_box, ready, go, results, count: int, bits: int) -> None:
    """The flooding party, in a process of its own (its threads and key making do not share this process's GIL):
    makes its keys, says ``ready``, waits for ``go``, sends the registrations, puts the statuses in ``results``."""
    flood = fresh_identities(count, bits)
    ready.set()
    go.wait()
    answers = register_all(url_box.value.decode(), flood, source=FLOOD_SOURCE, blocks=[0, 4])
    results.put([answer.status_code for answer in answers])


def run(work: Path, count: int, bits: int, protected: bool, samples: int) -> dict:
    port = bl.free_port()
    url = f"http://127.0.0.1:{port}"
    context = multiprocessing.get_context("spawn")
    url_box, ready, go, results = context.Array("c", url.encode()), context.Event(), context.Event(), context.Queue()
    flooder = context.Process(target=flood_process, args=(url_box, ready, go, results, count, bits), name="flood")
    flooder.start()  # makes its keys meanwhile
    honest = fresh_identities(HONEST, bits)
    flags = [] if protected else ["--registration-rate", "none", "--max-unproven-workers", "1000000"]
    proc = subprocess.Popen([sys.executable, "-m", "farworker", "coordinator", "--port", str(port), "--db",
                             str(work / f"coordinator-{protected}.sqlite3"), "--log-level", "warning", *flags],
                            cwd=bl.ROOT, env=bl.clean_env())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url + "/v1/workers", timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the coordinator did not start") from None
                time.sleep(0.2)
        assert all(a.status_code == 200 for a in register_all(url, honest, source="127.0.0.1", blocks=[0, 4]))
        before, size_before = time_gets(url, lambda: True, samples, samples)

        if not ready.wait(600):
            raise RuntimeError("the flooder made no keys in 10 minutes")
        started = time.monotonic()
        go.set()  # the flooder starts once its keys are made: this process times from here
        statuses: list[int] = []

        def done() -> bool:
            if not statuses and not results.empty():
                statuses.extend(results.get())
            return bool(statuses)

        during, size_during = time_gets(url, done, samples, 100_000)
        if not statuses:
            statuses.extend(results.get(timeout=600))
        flood_s = time.monotonic() - started
        flooder.join(30)
        after, size_after = time_gets(url, lambda: True, samples, samples)
        return {
            "protected": protected,
            "flood": count,
            "flood_s": round(flood_s, 1),
            "flood_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "workers_after": HONEST + statuses.count(200),
            "before": {**summary(before), "bytes": size_before},
            "during": {**summary(during), "bytes": size_during},
            "after": {**summary(after), "bytes": size_after},
        }
    finally:
        if flooder.is_alive():
            flooder.kill()
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=2000, help="registrations, each with a fresh key")
    parser.add_argument("--samples", type=int, default=200, help="GETs timed before and after (at least during)")
    parser.add_argument("--key-bits", type=int, default=1024)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="flood-bench-") as tmp:
        for protected in (True, False):
            bl.log(f"flood of {args.flood}, protections {'on' if protected else 'off'}")
            results.append(run(Path(tmp), args.flood, args.key_bits, protected, args.samples))
            bl.log(json.dumps(results[-1]))
    bl.write_json(args.out, {"machine": bl.machine_info(), "command": " ".join(sys.argv), "runs": results})


if __name__ == "__main__":
    main()
