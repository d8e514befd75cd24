"""A process's clock shifted with libfaketime (Debian's, installed by scripts/setup.sh --dev), nothing left behind.

libfaketime is preloaded into the process itself rather than through the `faketime` command: that command forks
the program and, on a test's SIGTERM, exited alone, leaving the program running for the rest of the suite. And
every program libfaketime starts in (the worker, each torch_shm_manager or `uname` it runs) makes its own
semaphore and shared-memory pair in /dev/shm and never removes it, unless FAKETIME_SHARED names a pair to share:
this one is made here, as the `faketime` command makes its own, and removed when the test is done.
"""

from __future__ import annotations

import _multiprocessing
import glob
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
_SEMAPHORE = 1  # _multiprocessing.SemLock's kind for a counting semaphore (RECURSIVE_MUTEX is 0)
_SHARED_BYTES = 8  # what libfaketime maps: one 64-bit tick counter (the `faketime` command's segment is 8 bytes)


@contextmanager
def clock_shifted(seconds: int) -> Iterator[dict[str, str]]:
    """The environment that shifts a program's clock (and its children's) by ``seconds``."""
    if LIBFAKETIME is None:
        raise RuntimeError("libfaketime missing: bash scripts/setup.sh --dev installs it")
    tag = f"farworker-test-faketime-{os.getpid()}-{secrets.token_hex(4)}"
    _multiprocessing.SemLock(_SEMAPHORE, 1, 1, f"/{tag}-sem", False)  # its name stays until sem_unlink
    try:
        shared = shared_memory.SharedMemory(name=f"{tag}-shm", create=True, size=_SHARED_BYTES)
        try:
            yield {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{seconds:+d}s", "FAKETIME_SHARED": f"/{tag}-sem /{tag}-shm"}
        finally:
            shared.close()
            shared.unlink()
    finally:
        _multiprocessing.sem_unlink(f"/{tag}-sem")
