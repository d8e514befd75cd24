"""Benchmark 14: the mesh page's load time with 100 workers registered (issue 20: under 200 ms).

A `farworker coordinator` process on loopback (no mesh: the page's cost is the ledger's views, not petals), 100
workers registered through the real API with signed requests (each its own RSA identity), each beating online with
half the tiny model's blocks and a few usage records. Then, interleaved per round: GET / (the whole page, server
rendered), GET /fragments/mesh (what the open page fetches every few seconds) and GET /v1/workers (the JSON the page
is built from, for comparison), each timed end to end from this process; medians and p90 over the rounds. With
--browser, also Debian's chromium (Playwright, headless) loading / : navigation start to the load event.

    python benchmarks/page_load.py --workers 100 --rounds 30 --browser --out benchmarks/results/page_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import benchlib as bl
import requests

from farworker.identity import load_or_create
from farworker.local_mesh import ManagedProcess, base_env, farworker_command

CHROMIUM = "/usr/bin/chromium"
MODEL = "farworker-tiny-llama"


def signed(url: str, identity, path: str, payload: dict) -> dict:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **identity.sign("POST", path, body)}
    answer = requests.post(url + path, data=body, headers=headers, timeout=30)
    answer.raise_for_status()
    return answer.json()


def register_workers(url: str, work: Path, count: int) -> None:
    now = time.time()
    for i in range(count):
        identity = load_or_create(work / "keys" / f"w{i}")
        span = [0, 2] if i % 2 == 0 else [2, 4]
        worker_id = signed(url, identity, "/v1/workers/register", {
            "wallet_address": "0x" + f"{i:02x}" * 20, "peer_id": identity.peer_id,
            "public_key": identity.public_key_b64, "model_name": MODEL, "blocks": span, "total_blocks": 4,
            "torch_dtype": "float32", "quant_type": "none", "location": f"rack {i // 8}",
            "version": "0.1.0", "announce_maddrs": [f"/ip4/127.0.0.1/tcp/{31000 + i}"],
            "host_id": f"host-{i // 4}", "instance": i % 4,
            "hardware": {"gpus": [], "gpu_count": 0, "driver_version": None, "cuda_version": None, "cpu": "x86_64",
                         "cpu_count": 2, "ram_bytes": 8 << 30},
        })["worker_id"]
        for _ in range(3):
            signed(url, identity, f"/v1/workers/{worker_id}/heartbeat", {
                "state": "online", "blocks": span, "uptime_seconds": 60.0, "gpus": [],
                "counters": {"requests": 1, "inference_steps": 3, "tokens_processed": 12, "errors": 0}})
        records = [{"id": str(uuid.uuid4()), "session_id": f"s{i}-{k}", "blocks": span, "tokens": 12, "steps": 3,
                    "started_at": now - 30, "ended_at": now - 29} for k in range(5)]
        signed(url, identity, f"/v1/workers/{worker_id}/usage", {"records": records})


def timed_get(session: requests.Session, url: str) -> float:
    started = time.perf_counter()
    answer = session.get(url, timeout=30)
    answer.raise_for_status()
    _ = answer.content
    return (time.perf_counter() - started) * 1000


def summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"median_ms": round(statistics.median(ordered), 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1), "min_ms": round(ordered[0], 1),
            "max_ms": round(ordered[-1], 1), "n": len(ordered)}


def browser_loads(url: str, rounds: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/")  # warm: the static files are cached from here on, as for a returning visitor
            loads = []
            for _ in range(rounds):
                page.reload(wait_until="load")
                loads.append(page.evaluate(
                    "(() => { const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd; })()"))
            return loads
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--browser", action="store_true", help="also time chromium's load of / (Playwright)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    load_start = bl.machine_info()
    with tempfile.TemporaryDirectory(prefix="fw-bench-page-") as tmp:
        work = Path(tmp)
        port = bl.free_port()
        url = f"http://127.0.0.1:{port}"
        coordinator = ManagedProcess("coordinator", farworker_command(
            "coordinator", "--port", str(port), "--db", str(work / "c.sqlite3"), "--heartbeat-interval", "30",
            "--log-level", "warning"), base_env(), work / "coordinator.log").start()
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    requests.get(url + "/v1/workers", timeout=2).raise_for_status()
                    break
                except requests.RequestException:
                    if time.monotonic() > deadline or not coordinator.alive:
                        raise SystemExit(f"coordinator did not start:\n{coordinator.log_tail()}") from None
                    time.sleep(0.2)
            started = time.monotonic()
            register_workers(url, work, args.workers)
            bl.log(f"{args.workers} workers registered in {time.monotonic() - started:.1f} s")
            session = requests.Session()
            paths = {"page": "/", "fragment": "/fragments/mesh", "json": "/v1/workers"}
            for path in paths.values():  # warm: templates compiled, SQLite pages cached
                timed_get(session, url + path)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, path in paths.items():
                    times[name].append(timed_get(session, url + path))
            page = session.get(url + "/", timeout=30).text
            result = {name: summary(ms) for name, ms in times.items()}
            result["page_bytes"] = len(page.encode())
            result["workers_on_page"] = page.count('class="worker ')
            if args.browser:
                result["browser_load"] = summary(browser_loads(url, args.rounds))
        finally:
            coordinator.stop(20)
    bl.write_json(args.out, {"benchmark": "page_load", "workers": args.workers, "rounds": args.rounds,
                             "target_ms": 200, "machine": load_start,
                             "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], **result})


if __name__ == "__main__":
    main()
