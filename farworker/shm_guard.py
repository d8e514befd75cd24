"""Refuse to serve with a /dev/shm too small for petals.

hivemind makes torch pass tensors between the worker's processes through files in /dev/shm. Docker's
default 64 MB /dev/shm makes a large forward fail ("unable to allocate shared memory ... No space left on
device"), and the failed request's segments leak, so later small requests fail too (../shared/facts.md).
Better to stop at start with one clear line than to serve and fail the first big request.

The minimum is a constant on purpose: MIN_SHM_BYTES (1 GiB). It is compared with the size of the /dev/shm
file system, and a /dev/shm that is already mostly full (leaked segments of killed servers on a host that
shares it) is refused as well (less than MIN_FREE_BYTES free).

Usage: ``problem = check_shm(MIN_SHM_BYTES)``; None when fine, else the line to print (exit 78).
``python -m farworker.shm_guard`` does the same check and exits 78 with the line (the container
entrypoint uses it before `farworker run`).
"""

from __future__ import annotations

import os
import sys

MIN_SHM_BYTES = 1 * 2**30  # 1 GiB: docker run --shm-size 1g (or more) passes
MIN_FREE_BYTES = 256 * 2**20  # below this much free, even mid-size requests fail
SHM_PATH = "/dev/shm"
EX_CONFIG = 78

_FIX = (
    "docker: run the container with --shm-size 2g (docker's default is 64 MB); "
    "systemd: the farworker unit gives the service its own /dev/shm (TemporaryFileSystem=/dev/shm:size=...); "
    "bare metal: mount -o remount,size=2G /dev/shm"
)


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_shm(min_bytes: int = MIN_SHM_BYTES, path: str = SHM_PATH) -> str | None:
    """None when ``path`` is a file system of at least ``min_bytes`` with room left, else the problem line."""
    try:
        st = os.statvfs(path)
    except OSError as error:
        return (
            f"/dev/shm is not usable ({error.strerror}): petals passes tensors between processes through "
            f"shared memory and needs at least {_human(min_bytes)}. Fix: {_FIX}"
        )
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    if total < min_bytes:
        return (
            f"/dev/shm is {_human(total)}, the worker needs at least {_human(min_bytes)}: petals passes "
            f"tensors between processes through shared memory and large requests would fail with "
            f"'No space left on device'. Fix: {_FIX}"
        )
    if free < min(MIN_FREE_BYTES, min_bytes):
        return (
            f"/dev/shm has only {_human(free)} free of {_human(total)} (leaked torch_* segments of stopped "
            f"servers?): requests would fail with 'No space left on device'. Remove stale /dev/shm/torch_* "
            f"files or give the worker its own /dev/shm. Fix: {_FIX}"
        )
    return None


def main() -> int:
    problem = check_shm()
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        return EX_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
