"""The coordinator is an optional extra: the worker's commands run without FastAPI and uvicorn, and the commands
that need them say so in one line (a worker host installed by the role has neither: molecule default checks that
on real hosts)."""

import subprocess
import sys
from pathlib import Path

import pytest

# A fresh interpreter in which FastAPI, uvicorn and starlette cannot be imported, as on a worker host.
WITHOUT_EXTRA = ("import sys; sys.modules.update(fastapi=None, uvicorn=None, starlette=None); "
                 "from farworker.cli import main; main(prog_name='farworker')")


def farworker_without_extra(*args):
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRA, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["check", "--help"], ["status", "--help"]])
def test_worker_commands_run_without_the_extra(args):
    result = farworker_without_extra(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage: farworker" in result.stdout


def test_check_config_only_runs_without_the_extra(monkeypatch):
    monkeypatch.setenv("FARLABS_WALLET_ADDRESS", "0x" + "1" * 40)
    monkeypatch.setenv("FARLABS_API_BASE_URL", "http://127.0.0.1:8080")
    monkeypatch.setenv("FARLABS_NEW_SWARM", "true")
    result = farworker_without_extra("check", "--config-only")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", [["coordinator"], ["demo"]])
def test_coordinator_commands_name_the_missing_extra_in_one_line(command):
    result = farworker_without_extra(*command)
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines() == [
        "the coordinator needs the farworker[coordinator] extra (fastapi, uvicorn not installed): "
        "pip install 'farworker[coordinator]'"]


def test_the_extra_is_found_where_it_is_installed():
    from farworker.coordinator.extra import missing_extra

    assert missing_extra() is None


def pins(name):
    lock = Path(__file__).resolve().parent.parent / "roles" / "farworker_package" / "files" / name
    return {line.split("==")[0].lower() for line in lock.read_text().splitlines() if line and line[0] != "#"}


def test_the_worker_lock_has_none_of_the_coordinators_set():
    """runtime.lock is what the role puts on every worker host; coordinator.lock only where the coordinator runs."""
    worker, coordinator = pins("runtime.lock"), pins("coordinator.lock")
    assert {"fastapi", "uvicorn", "starlette"} <= coordinator
    assert not worker & coordinator, worker & coordinator
    assert {"petals", "hivemind", "pydantic"} <= worker
