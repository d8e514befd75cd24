"""A host clock minutes off the coordinator's: `check` fails naming the offset and NTP, and `run`'s log says
"clock is N s off" once instead of one 401 per signed report. The clock is really shifted, with Debian's
libfaketime (tests/shifted_clock.py), against a real coordinator."""

from __future__ import annotations

import re
import subprocess
import time
from email.utils import formatdate

import pytest
from shifted_clock import LIBFAKETIME, clock_shifted
from shm_files import TreePids

from farworker.clock_offset import clock_problem, journal_line, offset_from_date
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.local_mesh import ManagedProcess, farworker_command, worker_env
from farworker.preflight import check_clock

needs_faketime = pytest.mark.skipif(LIBFAKETIME is None,
                                    reason="libfaketime missing: bash scripts/setup.sh --dev installs it")
FIVE_MINUTES = 300
# The measure's error on one host (clock_offset's docstring): the Date's second, uvicorn's once-a-second refresh of
# it (later on a loaded machine) and the request's time. CI saw "2 s ahead" on a busy 2-core machine.
AS_MEASURED_300_S_AHEAD = r"(29[89]|30[0-3])"
AS_MEASURED_IN_STEP = r"[0-3]"


def test_offset_is_this_host_minus_the_date_header():
    now = time.time()
    assert offset_from_date(formatdate(now - 312, usegmt=True), now, now) == pytest.approx(312, abs=1)
    assert offset_from_date(formatdate(now + 45, usegmt=True), now - 0.2, now + 0.2) == pytest.approx(-45, abs=1)
    assert offset_from_date(None, now, now) is None and offset_from_date("yesterday", now, now) is None


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 0.999])
def test_a_clock_in_step_reads_within_half_a_second_wherever_in_its_second_the_date_was_made(fraction):
    # The Date drops the fraction: read as the second's start, a clock in step would seem up to 1 s ahead.
    made_at = 1_700_000_000 + fraction
    assert abs(offset_from_date(formatdate(made_at, usegmt=True), made_at, made_at)) <= 0.5


def test_the_rule_fails_beyond_30_s_and_names_ntp():
    assert clock_problem(None) is None and clock_problem(29.6) is None and clock_problem(-30) is None
    problem = clock_problem(312.2)
    assert problem == ("this host's clock is 312 s ahead of the coordinator's; signed reports are refused beyond "
                       "60 s: fix NTP (timedatectl set-ntp true, chrony)")
    assert "45 s behind" in clock_problem(-45)
    assert check_clock(-45).line().startswith("FAIL clock: this host's clock is 45 s behind")
    assert check_clock(2).line() == "OK   clock: 2 s ahead of the coordinator's (within 30 s)"
    assert journal_line(-300).startswith("clock is -300 s off the coordinator's (300 s behind)")


@pytest.fixture
def coordinator(tmp_path):
    with RunningCoordinator(Settings(db_path=tmp_path / "coordinator.sqlite", heartbeat_interval_s=1.0)) as running:
        yield running


@needs_faketime
def test_check_fails_on_a_clock_five_minutes_ahead(tmp_path, coordinator):
    env = worker_env(tmp_path, "w", coordinator.url, [], "0:4")
    with clock_shifted(FIVE_MINUTES) as ahead:
        result = subprocess.run(farworker_command("check"), env={**env, **ahead}, capture_output=True, text=True,
                                timeout=120)
    clock = [line for line in result.stdout.splitlines() if " clock: " in line]
    assert len(clock) == 1 and re.match(rf"FAIL clock: this host's clock is {AS_MEASURED_300_S_AHEAD} s ahead "
                                        r"of the coordinator's; .*fix NTP", clock[0]), result.stdout
    assert result.returncode == 1

    result = subprocess.run(farworker_command("check"), env=env, capture_output=True, text=True, timeout=120)
    in_step = rf"^OK   clock: {AS_MEASURED_IN_STEP} s (ahead of|behind) the coordinator's"
    assert re.search(in_step, result.stdout, re.M), result.stdout


@needs_faketime
@pytest.mark.slow
def test_a_worker_five_minutes_ahead_logs_the_clock_once_not_401s(tmp_path, coordinator):
    with clock_shifted(FIVE_MINUTES) as ahead:
        env = worker_env(tmp_path, "w", coordinator.url, [], "0:4", {"FARLABS_HEARTBEAT_INTERVAL": "1", **ahead})
        worker = ManagedProcess("w", farworker_command("run"), env, tmp_path / "w.log").start()
        tree = TreePids(worker.process.pid)
        try:
            deadline = time.monotonic() + 120
            while "clock is" not in worker.log_tail(400) and time.monotonic() < deadline and worker.alive:
                time.sleep(0.2)
            time.sleep(8)  # several registration retries, each refused with 401
            assert worker.alive, worker.log_tail()
        finally:
            worker.stop(timeout=60)
            tree.close()
    assert tree.alive() == [], tree.commands  # the test's stop ended the shifted worker, all of it
    log = worker.log_path.read_text()
    once = rf"clock is \+{AS_MEASURED_300_S_AHEAD} s off the coordinator's \(\d+ s ahead of\)"
    assert re.search(once, log), log[-3000:]
    assert log.count("clock is") == 1, log[-3000:]
    assert "401" not in log, log[-3000:]
