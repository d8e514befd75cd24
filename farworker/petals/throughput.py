"""The throughput a worker announces to clients, measured locally once and cached.

Petals would run speedtest-cli (a public service; waits 60 s offline) and cache its result in its own
directory. We measure compute on this host once per (model, device, dtype, quantization), and take
network bandwidth from configuration (FARLABS_NETWORK_MBPS), so start-up makes no internet calls.
"""

from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path

from farworker.petals.compat import import_petals

log = logging.getLogger(__name__)
CACHE_FILE = "farworker-throughput.json"


def measured_rps(config, device, dtype, quant_type, cache_dir: Path, model_key: str) -> dict[str, float]:
    """{'inference_rps', 'forward_rps'} per block, from the cache or measured now (seconds on CPU)."""
    import_petals()
    from petals.server.throughput import get_device_name, get_dtype_name, measure_compute_rps

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = f"{model_key}|{get_device_name(device)}|{get_dtype_name(dtype, quant_type)}"
    path = cache_dir / CACHE_FILE
    with open(cache_dir / (CACHE_FILE + ".lock"), "wb") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one measurement per host at a time
        cache = _read(path)
        if key not in cache:
            log.info("Measuring compute throughput once for %s (cached in %s)", key, path)
            common = dict(quant_type=quant_type, tensor_parallel_devices=(device,))
            cache[key] = {
                "inference_rps": measure_compute_rps(config, device, dtype, n_tokens=1, n_steps=100,
                                                     inference=True, **common),
                "forward_rps": measure_compute_rps(config, device, dtype, n_tokens=1024, n_steps=10,
                                                   inference=False, **common),
            }
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
    return cache[key]


def announced_throughput(rps: dict[str, float], hidden_size: int, num_blocks: int, network_mbps: float) -> dict:
    """Petals' formula: requests start at a uniformly random block of ours, capped by the network."""
    network_rps = network_mbps * 1e6 / (hidden_size * 16)  # clients send 16-bit activations
    average_blocks_used = (num_blocks + 1) / 2
    throughput = min(rps["forward_rps"] / average_blocks_used, network_rps)
    return {**rps, "network_rps": network_rps, "throughput": throughput}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
