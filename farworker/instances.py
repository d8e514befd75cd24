"""One worker per GPU: which GPU an instance sees, where its state lives, what it takes over from a single worker.

A multi-GPU host runs `farworker@N.service` with FARLABS_INSTANCE=N, one per GPU, all reading the host's one
env file (petals#203: one server per GPU beats tensor parallelism). So that one inventory line configures
every GPU, everything an instance owns derives from N:
- its state dir is STATE_DIR/N and its ports are the configured ones plus N: the configuration applies these
  offsets as it loads (config.apply_instance);
- FARLABS_GPU names its GPU, and CUDA_VISIBLE_DEVICES is set to that GPU's UUID: NVML (and nvidia-smi) order
  GPUs by PCI bus, CUDA by speed unless CUDA_DEVICE_ORDER says otherwise, so an index could pick another card.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from farworker import gpu
from farworker.config import ConfigError, WorkerConfig
from farworker.status_file import is_fresh, read_status, status_path


def pin_gpu(config: WorkerConfig, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Make FARLABS_GPU the only GPU CUDA sees; returns its UUID (None: not pinned, or cpu).

    Runs before torch initialises CUDA (which reads CUDA_VISIBLE_DEVICES once). Heartbeats, registration and
    the status file then report this GPU only: NVML itself ignores CUDA_VISIBLE_DEVICES.
    """
    environ = os.environ if environ is None else environ
    if not config.gpu:
        return None
    if config.gpu == "cpu":
        environ["CUDA_VISIBLE_DEVICES"] = ""  # no GPU at all, even where a driver is installed
        gpu.own_gpus([])
        return None
    uuid = resolve_gpu(config.gpu, gpu.list_gpus())
    environ["CUDA_VISIBLE_DEVICES"] = uuid
    environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # harmless with one device; matches NVML if read
    gpu.own_gpus([uuid])
    return uuid


def resolve_gpu(wanted: str, gpus) -> str:
    """FARLABS_GPU (an NVML index or a UUID) -> the UUID of a GPU NVML lists; ConfigError otherwise."""
    listed = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none: no NVIDIA driver or GPU visible"
    for g in gpus:
        if (wanted.isdigit() and g.index == int(wanted)) or g.uuid.lower() == wanted.lower():
            return g.uuid
    raise ConfigError([f"FARLABS_GPU={wanted} names no GPU NVML lists: expected one of {listed}, or cpu"])


def instance_state_dirs(base: Path) -> list[tuple[int | None, Path]]:
    """The status-bearing state dirs under a host's base state dir: the single-unit worker's own (index
    None) and each instance's (base/N), in index order. Used by `farworker status` with no arguments."""
    found: list[tuple[int | None, Path]] = []
    if (base / "status.json").is_file():
        found.append((None, base))
    try:
        children = [p for p in base.iterdir() if p.name.isdigit() and (p / "status.json").is_file()]
    except OSError:
        children = []
    found += sorted(((int(p.name), p) for p in children), key=lambda item: item[0])
    return found


# What a single worker (farworker.service) keeps in its state dir that instance 0 must take over. The outbox's
# -wal file holds committed records until a checkpoint: it moves with the database.
SINGLE_UNIT_STATE = ("identity.key", "outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm")


def adopt_single_unit_state(state_dir: Path, instance: int | None) -> list[str]:
    """Upgrading a host from the single unit to farworker@0: instance 0 takes the single worker's identity (the
    same peer id, so the same worker id and ledger) and its usage outbox (unacknowledged records: nothing earned
    is lost). Does nothing once instance 0 has an identity of its own. Returns the names moved.

    Refuses (ConfigError) while the single worker still runs: two processes would share one peer id.
    """
    base = state_dir.parent
    if instance != 0 or (state_dir / "identity.key").exists() or not (base / "identity.key").exists():
        return []
    single = read_status(base)
    if single and single.get("state") != "stopped" and is_fresh(single) and _alive(single.get("pid")):
        raise ConfigError([f"the single-unit worker (pid {single.get('pid')}) still runs on {base}: expected "
                           "farworker.service stopped before farworker@0 takes over its identity and outbox"])
    state_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for name in SINGLE_UNIT_STATE:
        if (base / name).exists():
            os.replace(base / name, state_dir / name)  # same file system: atomic, and the data is not copied
            moved.append(name)
    status_path(base).unlink(missing_ok=True)  # else `farworker status` would list the old worker as stale
    return moved


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def gpu_inventory() -> list[dict]:
    """What `farworker gpus --json` prints for the Ansible role: one entry per GPU in NVML's order, with the minor
    number of its /dev/nvidiaN (the device its instance's unit allows; NVML index and minor number can differ)."""
    minors = gpu.minor_numbers()
    return [{"index": g.index, "uuid": g.uuid, "name": g.name, "minor_number": minors.get(g.index, g.index),
             "memory_total_bytes": g.memory_total_bytes} for g in gpu.list_gpus()]
