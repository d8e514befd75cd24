"""`farworker check`: what would stop `farworker run` on this host, one line per item.

Each line is OK, WARN (works, but below what the seed recommends) or FAIL (run would not serve), with
how to fix it. Exit 0 when nothing FAILs, 78 for a bad configuration, 1 for any other FAIL.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from farworker.config import EX_CONFIG, ConfigError, WorkerConfig, load_config

MIN_VRAM = 8 * 10**9  # the seed's minimum
MODEL_DISK = {"meta-llama/Llama-2-7b-chat-hf": 14e9, "meta-llama/Llama-2-13b-chat-hf": 27e9,
              "meta-llama/Llama-2-70b-chat-hf": 140e9}
CONNECT_TIMEOUT = 3.0


@dataclass
class Result:
    level: str  # OK, WARN, FAIL
    item: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<4} {self.item}: {self.detail}"


def run_preflight(overrides: dict, config_only: bool = False) -> int:
    try:
        config = load_config(overrides=overrides)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(f"FAIL configuration: {problem}")
        return EX_CONFIG
    click.echo("OK   configuration: valid")
    if config_only:
        return 0
    results = [check(config) for check in CHECKS]
    for result in results:
        click.echo(result.line())
    return 1 if any(r.level == "FAIL" for r in results) else 0


def check_gpu(config: WorkerConfig) -> Result:
    from farworker import gpu

    gpus, driver = gpu.list_gpus(), gpu.driver_info()
    if not gpus:
        if config.device == "cpu":
            return Result("OK", "GPU", "none needed: FARLABS_DEVICE=cpu")
        return Result("FAIL", "GPU", "no NVIDIA GPU visible through NVML; install the driver (roles/nvidia_driver) "
                      "or set FARLABS_DEVICE=cpu for a CPU test worker")
    names = ", ".join(f"{g.index}: {g.name}" for g in gpus)
    return Result("OK", "GPU", f"{names}; driver {driver.driver_version}, CUDA {driver.cuda_version}")


def check_vram(config: WorkerConfig) -> Result:
    from farworker import gpu

    gpus = gpu.list_gpus()
    if not gpus:
        return Result("OK" if config.device == "cpu" else "FAIL", "VRAM", "no GPU")
    best = max(gpus, key=lambda g: g.memory_total_bytes)
    detail = (f"{best.memory_total_bytes / 1e9:.1f} GB total, {best.memory_free_bytes / 1e9:.1f} GB free "
              f"on GPU {best.index}")
    blocks = _blocks_estimate(config)
    if blocks:
        detail += f"; would serve {blocks}"
    if best.memory_total_bytes < MIN_VRAM:
        return Result("WARN", "VRAM", detail + " (below the 8 GB minimum: expect few blocks and low earnings)")
    return Result("OK", "VRAM", detail)


def _blocks_estimate(config: WorkerConfig) -> str | None:
    if config.block_indices:
        return f"blocks {config.block_indices[0]}:{config.block_indices[1]}"
    if config.num_blocks:
        return f"{config.num_blocks} blocks"
    try:
        from farworker.block_plan import plan_blocks
        from farworker.model_source import resolve_model
        from farworker.petals_compat import import_petals

        import_petals()
        from petals.utils.auto_config import AutoDistributedConfig

        if not (config.is_tiny_model or config.is_local_model):
            return None  # needs the model's config from the hub; `run` decides
        block_config = AutoDistributedConfig.from_pretrained(resolve_model(config))
        return f"{plan_blocks(config, block_config).num_blocks} blocks (auto)"
    except Exception:
        return None


def check_disk(config: WorkerConfig) -> Result:
    path = _existing_parent(config.cache_dir)
    free = shutil.disk_usage(path).free
    need = MODEL_DISK.get(config.model_name, 0)
    detail = f"{free / 1e9:.1f} GB free in {config.cache_dir}"
    if need and free < need:
        return Result("FAIL", "disk", f"{detail}; {config.model_name} needs about {need / 1e9:.0f} GB: free space "
                      "or point FARLABS_CACHE_DIR at a larger disk")
    if config.max_disk_space and need and config.max_disk_space < need:
        return Result("FAIL", "disk",
                      f"FARLABS_MAX_DISK_SPACE is below the {need / 1e9:.0f} GB {config.model_name} needs")
    return Result("OK", "disk", detail + (f" (model needs about {need / 1e9:.0f} GB)" if need else ""))


def check_shm(config: WorkerConfig) -> Result:
    from farworker.shm_guard import check_shm as shm_problem

    usage = shutil.disk_usage("/dev/shm")
    problem = shm_problem()
    detail = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB"
    return Result("FAIL", "/dev/shm", problem) if problem else Result("OK", "/dev/shm", detail)


def check_bootstrap(config: WorkerConfig) -> Result:
    if config.new_swarm and not config.dht_bootstrap:
        return Result("OK", "bootstrap peers", "none: this worker starts a new private swarm")
    reachable = [addr for addr in config.dht_bootstrap if _tcp_reachable(*_host_port(addr))]
    detail = f"{len(reachable)} of {len(config.dht_bootstrap)} reachable"
    if not reachable:
        return Result("FAIL", "bootstrap peers", f"{detail}: check FARLABS_DHT_BOOTSTRAP and that the firewall "
                      "allows outbound TCP to them")
    return Result("OK" if len(reachable) == len(config.dht_bootstrap) else "WARN", "bootstrap peers", detail)


def check_api(config: WorkerConfig) -> Result:
    import requests

    try:
        answer = requests.get(f"{config.api_base_url}/v1/workers", timeout=CONNECT_TIMEOUT)
    except requests.RequestException as error:
        return Result("FAIL", "coordinator API", f"{config.api_base_url} unreachable ({type(error).__name__}); "
                      "check FARLABS_API_BASE_URL. The worker still serves and retries, but earns nothing meanwhile")
    return Result("OK", "coordinator API", f"{config.api_base_url} answers (HTTP {answer.status_code})")


def _host_port(maddr: str) -> tuple[str, int | None]:
    parts = maddr.strip("/").split("/")
    fields = dict(zip(parts[::2], parts[1::2], strict=False))
    host = fields.get("ip4") or fields.get("ip6") or fields.get("dns4") or fields.get("dns") or ""
    port = fields.get("tcp")
    return host, int(port) if port and port.isdigit() else None


def _tcp_reachable(host: str, port: int | None) -> bool:
    if not host or port is None:
        return False
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


CHECKS: tuple[Callable[[WorkerConfig], Result], ...] = (
    check_gpu, check_vram, check_disk, check_shm, check_bootstrap, check_api,
)
