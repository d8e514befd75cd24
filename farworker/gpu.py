"""GPU facts and telemetry from NVML (pynvml, from the nvidia-ml-py package).

A host without an NVIDIA driver is normal here (CPU tests, the demo): every function then returns
empty results instead of raising, and heartbeats carry an empty GPU list.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from farworker.gpu_xid import NOT_COUNTED, XidCounter

# pynvml and torch are imported where they are used: a host without an NVIDIA driver (CPU tests, the demo) is
# normal, and `farworker status` must not load torch.

log = logging.getLogger(__name__)
_lock = threading.Lock()
_initialized: bool | None = None
_xid_counter = None  # a gpu_xid.XidCounter while `farworker run` counts Xid errors
# The UUIDs of the GPUs this worker owns (instances.pin_gpu); None = every GPU NVML lists. NVML ignores
# CUDA_VISIBLE_DEVICES, so a worker pinned to one GPU of eight would otherwise report all eight.
_own_uuids: frozenset[str] | None = None


def own_gpus(uuids: list[str] | None) -> None:
    """Report only these GPUs in telemetry and registration (None: all of them)."""
    global _own_uuids
    _own_uuids = None if uuids is None else frozenset(u.lower() for u in uuids)


def owned(gpus: list[NvmlGpu]) -> list[NvmlGpu]:
    return gpus if _own_uuids is None else [g for g in gpus if g.uuid.lower() in _own_uuids]


def _nvml():
    """The pynvml module, initialized once; None when there is no usable driver."""
    global _initialized
    import pynvml

    with _lock:
        if _initialized is None:
            try:
                pynvml.nvmlInit()
                _initialized = True
            except pynvml.NVMLError as error:
                log.debug("NVML unavailable: %s", error)
                _initialized = False
    return pynvml if _initialized else None


@dataclass(frozen=True)
class NvmlGpu:
    """A GPU as NVML lists it (the worker's own reading; the coordinator's wire record of a GPU is another type)."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int


@dataclass(frozen=True)
class DriverInfo:
    driver_version: str
    cuda_version: str  # the highest CUDA version the driver supports, e.g. "12.4"


def driver_info() -> DriverInfo | None:
    nvml = _nvml()
    if nvml is None:
        return None
    cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
    return DriverInfo(str(_text(nvml.nvmlSystemGetDriverVersion())), f"{cuda // 1000}.{cuda % 1000 // 10}")


def _per_gpu(read) -> dict[int, object]:
    """GPU index -> ``read(nvml, handle)`` for every GPU that answers (empty without NVML)."""
    nvml = _nvml()
    if nvml is None:
        return {}
    answers = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        answer = _try(lambda i=index: read(nvml, nvml.nvmlDeviceGetHandleByIndex(i)))
        if answer is not None:
            answers[index] = answer
    return answers


def persistence_modes() -> dict[int, bool]:
    """GPU index -> persistence mode on (empty without NVML)."""
    return _per_gpu(lambda nvml, handle: nvml.nvmlDeviceGetPersistenceMode(handle) == nvml.NVML_FEATURE_ENABLED)


def kernel_module_version(path: str = "/proc/driver/nvidia/version") -> str | None:
    """The loaded kernel module's version (e.g. 580.65.06), which NVML's user-space library must equal."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+([0-9]+(?:\.[0-9]+)+)", text)
    return match.group(1) if match else None


# One line for `farworker check` and `farworker run`. The usual cause is the CUDA image started without
# `--gpus all`: the container then has torch's CUDA libraries but no driver and no device.
NO_GPU_VISIBLE = ("no GPU visible: run with --gpus all (NVIDIA Container Toolkit); on a host without a container, "
                  "install the NVIDIA driver (roles/nvidia_driver); or set FARLABS_DEVICE=cpu")


def cuda_build_without_gpu(device: str, pinned: str = "") -> str | None:
    """NO_GPU_VISIBLE when torch is a CUDA build, the configuration asks for a GPU and neither NVML nor torch sees
    one; otherwise None.

    device: FARLABS_DEVICE (auto counts as asking: a CUDA build exists to serve on a GPU, and falling back to the
    CPU would serve a GPU-sized model at a fraction of the speed without anyone noticing). pinned: FARLABS_GPU.
    A CPU build of torch never asks: CPU workers and the tests run it.
    """
    if device == "cpu" or pinned == "cpu":
        return None
    import torch

    if not torch.version.cuda or list_gpus() or torch.cuda.is_available():
        return None
    return NO_GPU_VISIBLE


def minor_numbers() -> dict[int, int]:
    """GPU index -> N of its /dev/nvidiaN (empty without NVML): a unit allows its instance that device only."""
    return _per_gpu(lambda nvml, handle: int(nvml.nvmlDeviceGetMinorNumber(handle)))


def list_gpus() -> list[NvmlGpu]:
    nvml = _nvml()
    if nvml is None:
        return []
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpus.append(NvmlGpu(index, _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle)),
                            int(memory.total), int(memory.free)))
    return gpus


def telemetry() -> list[dict]:
    """Per-GPU readings for heartbeats and /metrics; a field NVML can't read on this GPU is None.

    The Xid fields are None where no counter runs (see start_xid_counter) or the GPU reports no Xid events.
    """
    nvml = _nvml()
    if nvml is None:
        return []
    xids = _xid_counter
    readings = []
    for gpu in owned(list_gpus()):
        handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
        utilization = _try(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        readings.append({
            "index": gpu.index,
            "name": gpu.name,
            "uuid": gpu.uuid,
            "utilization_pct": utilization.gpu if utilization else None,
            "memory_used_bytes": int(memory.used),
            "memory_total_bytes": int(memory.total),
            "temperature_c": _try(lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            "power_w": _try(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            "sm_clock_mhz": _try(lambda h=handle: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
            "mem_clock_mhz": _try(lambda h=handle: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)),
            "ecc_volatile_uncorrected": _try(lambda h=handle: nvml.nvmlDeviceGetTotalEccErrors(
                h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)),
            "retired_pages_dbe": _retired_pages(nvml, handle),
            **(xids.readings(gpu.index) if xids else NOT_COUNTED),
        })
    return readings


def start_xid_counter() -> None:
    """Count each GPU's Xid errors from now on, in a daemon thread; nothing at all on a host without NVML."""
    global _xid_counter
    import pynvml

    nvml = _nvml()
    if nvml is None or _xid_counter is not None:
        return
    counter = XidCounter(nvml)
    try:
        started = counter.start()
    except pynvml.NVMLError as error:  # the worker serves without Xid counts rather than not at all
        log.warning("Xid errors not counted: %s", error)
        return
    if started:
        _xid_counter = counter


def stop_xid_counter(timeout: float = 2.0) -> None:
    global _xid_counter
    counter, _xid_counter = _xid_counter, None
    if counter is not None and not counter.stop(timeout):
        log.warning("The Xid counter thread did not end within %.1f s", timeout)


def hardware_summary() -> dict:
    """What registration reports about this host."""
    gpus = owned(list_gpus())
    driver = driver_info()
    return {
        "gpus": [{k: v for k, v in asdict(g).items() if k != "memory_free_bytes"} for g in gpus],
        "gpu_count": len(gpus),
        "driver_version": driver.driver_version if driver else None,
        "cuda_version": driver.cuda_version if driver else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
    }


def _retired_pages(nvml, handle) -> int | None:
    # Xid errors reach us only as events (gpu_xid counts them while the worker runs); pages retired after
    # double-bit ECC errors are the persistent, countable sign of failing memory.
    pages = _try(lambda: nvml.nvmlDeviceGetRetiredPages(
        handle, nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))
    return len(pages) if pages is not None else None


def _try(read):
    import pynvml

    try:
        return read()
    except pynvml.NVMLError:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
