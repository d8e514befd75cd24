"""The demo's signal rule, without a mesh: the first SIGTERM or SIGINT ends the run, none ends the stop, and the
exit status says which signal came (test_shm_cleanup.py runs it on the real demo)."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from farworker.demo import SignalStop, StopRequested


@pytest.fixture
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_ends_the_run_and_a_later_one_is_only_noted(signum, restore_handlers):
    stop = SignalStop().install()
    with pytest.raises(StopRequested):
        os.kill(os.getpid(), signum)
    os.kill(os.getpid(), signal.SIGTERM)  # a second one, during the stop: noted, not raised
    assert stop.exit_status(0) == 128 + signum


def test_a_signal_during_the_stop_is_not_raised_and_still_sets_the_exit_status(restore_handlers):
    stop = SignalStop().install()
    stop.disarm()  # the stop has begun
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.exit_status(0) == 128 + signal.SIGTERM


def test_no_signal_leaves_the_runs_own_status(restore_handlers):
    assert SignalStop().install().exit_status(1) == 1


def test_code_that_catches_exception_does_not_swallow_the_stop(restore_handlers):
    SignalStop().install()
    with pytest.raises(StopRequested), contextlib.suppress(Exception):  # as a retry loop's catch-all would
        os.kill(os.getpid(), signal.SIGTERM)
