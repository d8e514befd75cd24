"""farworker.shm_guard: the /dev/shm size check the worker (and the container entrypoint) run at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from farworker import shm_guard
from farworker.shm_guard import MIN_SHM_BYTES, check_shm


def fake_statvfs(monkeypatch, total: int, free: int, frsize: int = 4096):
    result = os.statvfs_result(
        (frsize, frsize, total // frsize, free // frsize, free // frsize, 0, 0, 0, 0, 255)
    )
    monkeypatch.setattr(shm_guard.os, "statvfs", lambda path: result)


def test_docker_default_64mb_is_refused_with_the_fix(monkeypatch):
    fake_statvfs(monkeypatch, 64 * 2**20, 64 * 2**20)
    problem = check_shm(MIN_SHM_BYTES)
    assert problem.startswith("/dev/shm is 64 MiB, the worker needs at least 1.00 GiB")
    assert "--shm-size" in problem and "TemporaryFileSystem" in problem


def test_docker_shm_size_1g_passes(monkeypatch):
    fake_statvfs(monkeypatch, 2**30, 2**30 - 8192)
    assert check_shm(MIN_SHM_BYTES) is None


def test_full_shm_is_refused(monkeypatch):
    fake_statvfs(monkeypatch, 8 * 2**30, 10 * 2**20)
    assert "only 10 MiB free of 8.00 GiB" in check_shm(MIN_SHM_BYTES)


def test_missing_shm_is_refused(tmp_path):
    assert "not usable" in check_shm(MIN_SHM_BYTES, str(tmp_path / "nope"))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_module_exit_status():
    """`python -m farworker.shm_guard`: 0 or 78 with one 'config error:' line, as the entrypoint needs."""
    result = subprocess.run([sys.executable, "-m", "farworker.shm_guard"], capture_output=True, text=True)
    expected = check_shm()
    assert result.returncode == (78 if expected else 0)
    assert result.stderr == (f"config error: {expected}\n" if expected else "")
