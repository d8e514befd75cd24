"""A small tmpfs the test mounts itself (root only) and a file that fills it until ENOSPC: a real full disk,
for the worker's state dir (test_full_state_dir) and the coordinator's database (test_coordinator_full_disk)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(name="small_dir")
def small_dir_fixture(tmp_path):
    """An 8 MiB tmpfs under the test's tmp_path, unmounted afterwards; skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system refuses (ENOSPC); returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 65536)
    return filler
