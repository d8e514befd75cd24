"""`farworker check`: what would stop `farworker run` on this host, one line per item.

Each line is OK, WARN (works, but below what the seed recommends) or FAIL (run would not serve), with
how to fix it. Exit 0 when nothing FAILs, 78 for a bad configuration, 1 for any other FAIL.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import requests
from requests.exceptions import InvalidSchema, InvalidURL, MissingSchema

from farworker import gpu, shm_guard
from farworker.block_plan import auto_count, per_block_bytes
from farworker.catalog import MODEL_DISK_BYTES, SUPPORTED_MODEL_SHAPES
from farworker.clock_offset import MAX_OFFSET_S, clock_problem, describe, offset_from_date
from farworker.config import EX_CONFIG, ConfigError, WorkerConfig, load_config
from farworker.disk_space import disk_problems, format_size, read_cache_disk
from farworker.gpu import NvmlGpu
from farworker.instances import resolve_gpu
from farworker.model_source import complete_snapshot, downloaded_bytes, repo_cache_dir
from farworker.petals.model_config import block_config_from_pretrained, llama_block_config
from farworker.status_file import is_fresh, read_status
from farworker.tiny_model import TINY_CONFIG

# torch is imported inside the checks that need it: `check --config-only` (run before every restart) must not
# pay seconds for it.
MIN_VRAM = 8 * 10**9  # the seed's minimum
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
    # the GPU line, then one VRAM line per GPU a worker would serve on, then the host-wide checks
    results = [check_gpu(config), *check_every_gpu(config), *(check(config) for check in CHECKS)]
    results += check_api_and_clock(config)
    results += check_driver_stack(config)
    results.append(check_reachability(config))  # the coordinator's view of this host, last
    for result in results:
        click.echo(result.line())
    return 1 if any(r.level == "FAIL" for r in results) else 0


def check_gpu(config: WorkerConfig, gpus: list[NvmlGpu] | None = None) -> Result:
    gpus = gpu.list_gpus() if gpus is None else gpus
    if not gpus:
        if config.device == "cpu" or config.gpu == "cpu":
            return Result("OK", "GPU", "none needed: " + ("FARLABS_DEVICE=cpu" if config.device == "cpu" else
                                                            "FARLABS_GPU=cpu"))
        refusal = gpu.cuda_build_without_gpu(config.device, config.gpu)
        if refusal:  # the words `farworker run` refuses with
            return Result("FAIL", "GPU", refusal)
        return Result("FAIL", "GPU", "no NVIDIA GPU visible through NVML; install the driver (roles/nvidia_driver) "
                      "or set FARLABS_DEVICE=cpu for a CPU test worker")
    driver = gpu.driver_info()
    names = ", ".join(f"{g.index}: {g.name}" for g in gpus)
    versions = f"driver {driver.driver_version}, CUDA {driver.cuda_version}" if driver else "driver unknown"
    return Result("OK", "GPU", f"{names}; {versions}")


def driver_stack_results(driver, torch_cuda: str | None, kernel_module: str | None,
                         persistence: dict[int, bool]) -> list[Result]:
    """The driver against what runs on it: the CUDA version torch was built for (CUDA 13 needs driver branch
    580+), the kernel module NVML talks to (a driver upgraded without a reboot or module reload: "Driver/
    library version mismatch"), and persistence mode (without it each process start re-initialises the GPU)."""
    results = []
    if torch_cuda:
        if _version(driver.cuda_version) < _version(torch_cuda):
            results.append(Result("FAIL", "driver vs CUDA", f"driver {driver.driver_version} supports CUDA "
                                  f"{driver.cuda_version}, torch needs CUDA {torch_cuda}: install driver branch "
                                  f"{MIN_DRIVER_BRANCH.get(torch_cuda.split('.')[0], 'newer')} or newer "
                                  "(nvidia_driver_branch)"))
        else:
            results.append(Result("OK", "driver vs CUDA", f"driver supports CUDA {driver.cuda_version}, torch "
                                  f"built for {torch_cuda}"))
    if kernel_module is None:
        results.append(Result("WARN", "kernel module", "/proc/driver/nvidia/version not readable (a container "
                              "without it, or no module loaded)"))
    elif kernel_module != driver.driver_version:
        results.append(Result("FAIL", "kernel module", f"loaded module {kernel_module}, user-space driver "
                              f"{driver.driver_version} (Driver/library version mismatch): reboot, or reload "
                              "the nvidia modules"))
    else:
        results.append(Result("OK", "kernel module", f"{kernel_module}, the same as the user-space driver"))
    off = sorted(index for index, on in persistence.items() if not on)
    if off:
        results.append(Result("WARN", "persistence mode", f"off on GPU {', '.join(map(str, off))}: "
                              "`nvidia-smi -pm 1` or the nvidia-persistenced service (roles/nvidia_driver)"))
    elif persistence:
        results.append(Result("OK", "persistence mode", "on"))
    return results


# The oldest driver branch each CUDA major version runs on (NVIDIA's compatibility table).
MIN_DRIVER_BRANCH = {"11": "450", "12": "525", "13": "580"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def check_driver_stack(config: WorkerConfig) -> list[Result]:
    driver = gpu.driver_info()
    if driver is None:
        return []  # check_gpu already says there is no driver
    import torch

    return driver_stack_results(driver, torch.version.cuda, gpu.kernel_module_version(), gpu.persistence_modes())


def check_every_gpu(config: WorkerConfig, gpus: list[NvmlGpu] | None = None) -> list[Result]:
    """VRAM and the blocks `run` would serve, for each GPU a worker would serve on: FARLABS_GPU's when pinned,
    else every GPU NVML lists when there are several (a multi-GPU host runs one worker per GPU, farworker@N,
    each planned on its own card), else the one FARLABS_DEVICE picks."""
    gpus = gpu.list_gpus() if gpus is None else gpus
    if config.gpu == "cpu":
        return [check_vram(replace(config, device="cpu"), gpus)]
    if config.device == "cpu" or (not config.gpu and len(gpus) < 2):
        return [check_vram(config, gpus)]
    if config.gpu:
        try:
            uuid = resolve_gpu(config.gpu, gpus)
        except ConfigError as error:
            return [Result("FAIL", "GPU", error.problems[0])]
        serving = [g for g in gpus if g.uuid == uuid]
    else:
        serving = gpus
    return [replace(check_vram(replace(config, device=f"cuda:{g.index}"), gpus), item=f"VRAM GPU {g.index}")
            for g in serving]


def check_vram(config: WorkerConfig, gpus: list[NvmlGpu] | None = None) -> Result:
    """The serving GPU's memory and the blocks `run` would serve there; gpus: NVML's list unless given."""
    gpus = gpu.list_gpus() if gpus is None else gpus
    serving = None if config.device == "cpu" else _serving_gpu(config, gpus)
    if serving is None and gpus and config.device != "cpu":
        known = ", ".join(str(g.index) for g in gpus)
        return Result("FAIL", "VRAM", f"FARLABS_DEVICE={config.device} names no GPU NVML lists ({known})")
    level, plan = blocks_to_serve(config, serving) or ("OK", "")
    if serving is None:  # check_gpu says how to get one when FARLABS_DEVICE isn't cpu
        return Result(level if config.device == "cpu" else "FAIL", "VRAM", "no GPU" + (f"; {plan}" if plan else ""))
    detail = (f"{serving.memory_total_bytes / 1e9:.1f} GB total, {serving.memory_free_bytes / 1e9:.1f} GB free "
              f"on GPU {serving.index}" + (f"; {plan}" if plan else ""))
    if level == "FAIL":
        return Result("FAIL", "VRAM", detail)
    if serving.memory_total_bytes < MIN_VRAM:
        return Result("WARN", "VRAM", detail + " (below the 8 GB minimum: expect few blocks and low earnings)")
    return Result("OK", "VRAM", detail)


def blocks_to_serve(config: WorkerConfig, serving: NvmlGpu | None) -> tuple[str, str] | None:
    """(level, text) for the blocks `run` would serve on this GPU (None: on CPU), by block_plan's formula.

    None when the model's shape is unknown. No network: the shape comes from the model's config.json in
    the cache, the embedded tiny model, a local directory, or the allowlisted models' known shapes.
    """
    if config.block_indices:
        return "OK", f"would serve blocks {config.block_indices[0]}:{config.block_indices[1]} (FARLABS_BLOCK_INDICES)"
    if config.num_blocks:
        return "OK", f"would serve {config.num_blocks} blocks (FARLABS_NUM_BLOCKS)"
    try:
        import torch

        shape = model_shape(config)
        if shape is None:
            return None
        block_config, source = shape
        layers, dtype = block_config.num_hidden_layers, getattr(torch, config.torch_dtype)
        if serving is None:  # as plan_blocks on CPU: a small model whole, otherwise the operator says
            per_block = per_block_bytes(block_config, dtype, "none")
            if auto_count(block_config, per_block, None):
                return "OK", f"would serve all {layers} blocks on CPU"
            return "FAIL", (f"{config.model_name} has {layers} blocks of {format_size(per_block)} ({source}): "
                            "without a GPU, set FARLABS_NUM_BLOCKS (or FARLABS_BLOCK_INDICES) to what this host serves")
        quant = "nf4" if config.quant_type == "auto" else config.quant_type
        per_block = per_block_bytes(block_config, dtype, quant)
        count = auto_count(block_config, per_block, serving.memory_free_bytes)
        sizes = f"{format_size(per_block)} per block with its attention cache, {quant}, {source}"
        if count < 1:
            return "FAIL", f"not one block fits ({sizes}): free GPU memory or serve a smaller model"
        return "OK", f"would serve {count} of {layers} blocks (auto: {sizes})"
    except Exception:  # a preflight reports what it can; `run` plans again and says what is wrong
        return None


def model_shape(config: WorkerConfig):
    """(petals block config, where its shape came from), or None; never asks the hub."""
    if config.is_tiny_model:
        return llama_block_config(**TINY_CONFIG), "embedded tiny model"
    directory = Path(config.model_name) if config.is_local_model else _cached_snapshot(config)
    if directory is not None:
        return block_config_from_pretrained(str(directory)), f"{directory / 'config.json'}"
    if config.model_name in SUPPORTED_MODEL_SHAPES:
        return llama_block_config(**SUPPORTED_MODEL_SHAPES[config.model_name]), "known shape"
    return None


def _cached_snapshot(config: WorkerConfig) -> Path | None:
    """The cache's snapshot of the model holding a config.json: a complete download first, else the newest."""
    complete = complete_snapshot(config.cache_dir, config.model_name)
    if complete is not None and (complete / "config.json").is_file():
        return complete
    found = sorted((repo_cache_dir(config.cache_dir, config.model_name) / "snapshots").glob("*/config.json"),
                   key=lambda path: path.stat().st_mtime)
    return found[-1].parent if found else None


def _serving_gpu(config: WorkerConfig, gpus: list[NvmlGpu]) -> NvmlGpu | None:
    """The GPU `run` would use: FARLABS_DEVICE=cuda:N, else the first (as block_plan.resolve_device)."""
    index = int(config.device.split(":")[1]) if config.device.startswith("cuda:") else 0
    return next((g for g in gpus if g.index == index), None)


def check_disk(config: WorkerConfig) -> Result:
    """disk_space's rule, which `run` applies before downloading, with the catalogue's size of the model (a model
    the catalogue does not size, such as the tiny one or a local directory, needs nothing downloaded)."""
    need = MODEL_DISK_BYTES.get(config.model_name, 0)
    repo_dir = repo_cache_dir(config.cache_dir, config.model_name)
    disk = read_cache_disk(config.cache_dir, repo_dir, config.max_disk_space)
    problems = disk_problems(config.cache_dir, config.model_name, need,
                             downloaded_bytes(config.cache_dir, config.model_name), config.max_disk_space, disk)
    if problems:
        return Result("FAIL", "disk", "; ".join(problems))
    detail = f"{format_size(disk.free)} free in {config.cache_dir}"
    return Result("OK", "disk", detail + (f" (model needs about {format_size(need)})" if need else ""))


def check_shm(config: WorkerConfig) -> Result:
    usage = shutil.disk_usage("/dev/shm")
    problem = shm_guard.check_shm()
    detail = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB"
    return Result("FAIL", "/dev/shm", problem) if problem else Result("OK", "/dev/shm", detail)


def check_bootstrap(config: WorkerConfig) -> Result:
    # `run` cannot join without them: hivemind's DHT raises when none of its initial peers answers.
    if config.new_swarm and not config.dht_bootstrap:
        return Result("OK", "bootstrap peers", "none: this worker starts a new private swarm")
    over_tcp = [addr for addr in config.dht_bootstrap if _host_port(addr)[1] is not None]
    reachable = [addr for addr in over_tcp if _tcp_reachable(*_host_port(addr))]
    unchecked = len(config.dht_bootstrap) - len(over_tcp)
    detail = f"{len(reachable)} of {len(config.dht_bootstrap)} reachable"
    if unchecked:
        detail += f" ({unchecked} QUIC, not checked: a TCP connect can't tell)"
    if not reachable and not unchecked:
        return Result("FAIL", "bootstrap peers", f"{detail}: check FARLABS_DHT_BOOTSTRAP and that the firewall "
                      "allows outbound TCP to them")
    return Result("OK" if len(reachable) == len(config.dht_bootstrap) else "WARN", "bootstrap peers", detail)


def check_api_and_clock(config: WorkerConfig) -> list[Result]:
    """The coordinator API line, then the clock line when the API answered (its Date header)."""
    result, offset = _ask_api(config)
    return [result] if offset is None else [result, check_clock(offset)]


def _ask_api(config: WorkerConfig) -> tuple[Result, float | None]:
    """The API's line and this host's clock offset from the answer's Date header (None without an answer): the
    first replica that answers (FARLABS_API_BASE_URL may list several)."""
    unreachable = []
    for url in config.api_base_urls:
        sent_at = time.time()
        try:
            answer = requests.get(f"{url}/v1/workers", params={"limit": 1}, timeout=CONNECT_TIMEOUT)
        except (InvalidURL, InvalidSchema, MissingSchema) as error:  # no retry can fix these
            return Result("FAIL", "coordinator API", f"{url} is malformed ({error}): fix FARLABS_API_BASE_URL"), None
        except requests.RequestException as error:
            unreachable.append(f"{url} unreachable ({type(error).__name__})")
            continue
        offset = offset_from_date(answer.headers.get("Date"), sent_at, time.time())
        also = f"; {', '.join(unreachable)}" if unreachable else ""
        return Result("OK", "coordinator API", f"{url} answers (HTTP {answer.status_code}){also}"), offset
    # reporting.Reporter retries registration with backoff; usage waits in the outbox meanwhile
    return Result("WARN", "coordinator API", f"{', '.join(unreachable)}: "
                  "`farworker run` serves anyway, retries registration and keeps usage in its outbox until the "
                  "API answers; check FARLABS_API_BASE_URL and outbound HTTP(S)"), None


def check_clock(offset: float | None) -> Result:
    """The offset from the coordinator's Date header (check_api's answer): beyond 30 s, `run`'s reports are
    about to be refused."""
    problem = clock_problem(offset)
    if problem:
        return Result("FAIL", "clock", problem)
    if offset is None:
        return Result("OK", "clock", "not measured: the coordinator did not answer with a Date header")
    return Result("OK", "clock", f"{describe(offset)} the coordinator's (within {MAX_OFFSET_S:g} s)")


def check_reachability(config: WorkerConfig) -> Result:
    """What the coordinator found when it last dialled this worker's announced addresses (directly, no relay):
    a running worker keeps the coordinator's heartbeat answer in its status file."""
    status = read_status(config.state_dir) or {}
    beat = status.get("last_heartbeat") if status and is_fresh(status) else None
    if not beat:
        return Result("OK", "reachability", "not known: no running worker here has a coordinator's answer (the "
                      "coordinator dials the announced addresses with each spot check)")
    unreachable = (beat.get("answer") or {}).get("unreachable")
    if unreachable:
        return Result("WARN", "reachability", f"{unreachable}: clients cannot dial these either; fix "
                      "FARLABS_ANNOUNCE_MADDRS, the firewall or the port forwarding")
    return Result("OK", "reachability", "the coordinator has not reported this worker unreachable")


def _host_port(maddr: str) -> tuple[str, int | None]:
    parts = maddr.strip("/").split("/")
    fields = dict(zip(parts[::2], parts[1::2], strict=False))
    host = next((fields[name] for name in ("ip4", "ip6", "dns", "dns4", "dns6") if name in fields), "")
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


CHECKS: tuple[Callable[[WorkerConfig], Result], ...] = (
    check_disk, check_shm, check_bootstrap,
)  # after check_gpu and check_every_gpu (a VRAM line per GPU); then check_api_and_clock; check_driver_stack last
