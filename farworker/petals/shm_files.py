"""Which /dev/shm files torch made, and which process made each (torch's own naming).

hivemind sets torch's sharing strategy to "file_system" (hivemind/utils/mpfuture.py), so every tensor shared
between the worker's processes lives in a named /dev/shm file. torch names it ``/torch_<pid>_<random>_<counter>``
with the creating process's pid (aten/src/ATen/MapAllocator.cpp, NewProcessWideShmHandle; the format string
"/torch_{}_{}_{}" is in libtorch_cpu.so). A file is unlinked only when its last user releases it, or by
torch_shm_manager when its last client disconnects: a process that is terminated while it holds one (every
handler and DHT process at a stop), or a manager that is terminated itself, leaves the file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_PREFIX = "torch_"


def creator_pid(name: str) -> int | None:
    """The pid in a torch shared-memory file's name, or None for any other file."""
    if not name.startswith(_PREFIX):
        return None
    pid = name[len(_PREFIX):].split("_", 1)[0]
    return int(pid) if pid.isdigit() else None


def files_by_pid(shm_dir: Path = SHM_DIR) -> dict[int, list[Path]]:
    """torch's files in ``shm_dir``, grouped by the pid that created each."""
    found: dict[int, list[Path]] = {}
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return found
    for name in names:
        pid = creator_pid(name)
        if pid is not None:
            found.setdefault(pid, []).append(shm_dir / name)
    return found
