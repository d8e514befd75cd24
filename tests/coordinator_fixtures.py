"""Helpers shared by the coordinator and reporter tests (payloads a worker sends, raw signed requests)."""

from __future__ import annotations

import contextlib
import json

import requests

from farworker.identity import Identity


def registration(
    identity: Identity, blocks=(0, 2), total_blocks=4, model_name="farworker-tiny-llama"
) -> dict:
    return {
        "wallet_address": "0x" + "ab" * 20,
        "peer_id": identity.peer_id,
        "public_key": identity.public_key_b64,
        "model_name": model_name,
        "blocks": list(blocks),
        "total_blocks": total_blocks,
        "torch_dtype": "float32",
        "quant_type": "none",
        "location": "Test Lab",
        "version": "0.1.0",
        "announce_maddrs": ["/ip4/127.0.0.1/tcp/31337"],
        "hardware": {
            "gpus": [],
            "gpu_count": 0,
            "driver_version": None,
            "cuda_version": None,
            "cpu": "x86_64",
            "cpu_count": 2,
            "ram_bytes": 8 << 30,
        },
    }


def heartbeat(state="online", blocks=(0, 2), tokens=0, gpus=None) -> dict:
    return {
        "state": state,
        "blocks": list(blocks),
        "uptime_seconds": 12.5,
        "gpus": gpus if gpus is not None else [],
        "counters": {"requests": 1, "inference_steps": 3, "tokens_processed": tokens, "errors": 0},
    }


GPU_READING = {
    "index": 0,
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-0000",
    "utilization_pct": 37.0,
    "memory_used_bytes": 10 << 30,
    "memory_total_bytes": 80 << 30,
    "temperature_c": 41.0,
    "power_w": 180.5,
    "sm_clock_mhz": 1980,
    "mem_clock_mhz": 2619,
    "ecc_volatile_uncorrected": 0,
    "retired_pages_dbe": 0,
}


def signed_post(
    base_url: str,
    identity: Identity,
    path: str,
    payload,
    *,
    headers=None,
    sign_body=None,
    sign_path=None,
    **sign_kwargs,
) -> requests.Response:
    """POST ``payload`` signed by ``identity``; ``sign_body``/``sign_path`` sign other bytes (tampering)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = identity.sign(
        "POST", sign_path or path, body if sign_body is None else sign_body, **sign_kwargs
    )
    all_headers = {"Content-Type": "application/json", **signature, **(headers or {})}
    return requests.post(base_url + path, data=body, headers=all_headers, timeout=10)


def worker_view(url: str, peer_id: str) -> dict | None:
    """The coordinator's list entry for the worker with ``peer_id`` (None until it registered), page after page."""
    cursor = None
    for _ in range(1000):  # bounded: 1,000 pages of 1,000
        page = requests.get(f"{url}/v1/workers", params={"limit": 1000, **({"cursor": cursor} if cursor else {})},
                            timeout=10).json()
        found = next((w for w in page["workers"] if w["peer_id"] == peer_id), None)
        if found is not None or page["next_cursor"] is None:
            return found
        cursor = page["next_cursor"]
    return None


@contextlib.contextmanager
def two_workers_serving(mesh, bootstrap):
    """Start ``mesh``'s coordinator and two ``farworker run`` workers splitting the tiny model, wait until both are
    online, and stop them, the coordinator and ``bootstrap`` on the way out. ``mesh`` has ``work``, ``peers``,
    ``url``, ``workers``, ``coordinator`` and ``start_coordinator()``."""
    from farworker.local_mesh import split_blocks, start_worker, stop_all
    from farworker.tiny_model import TINY_CONFIG

    try:
        mesh.start_coordinator()
        for i, span in enumerate(split_blocks(TINY_CONFIG["num_hidden_layers"], 2)):
            mesh.workers.append(start_worker(mesh.work, f"worker{i + 1}", mesh.url, mesh.peers, span))
        for worker in mesh.workers:
            worker.wait_online(timeout=180)
        yield mesh
    finally:
        stop_all((worker.proc for worker in mesh.workers), timeout=30)  # together: each drain takes seconds
        if mesh.coordinator is not None:
            mesh.coordinator.stop()
        bootstrap.stop()
