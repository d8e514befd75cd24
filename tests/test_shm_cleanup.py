"""A farworker process tree leaves nothing in /dev/shm: after a SIGTERMed demo, a SIGTERMed worker, and (at the
next start) a SIGKILLed one; tests/test_demo_and_check.py checks a demo that ran to its end.

Each test owns only the files its processes made: torch names each file with the creating pid
(farworker/petals/shm_files.py), and the tests collect their processes' pids, whole trees, while they run
(tests/shm_files.py). Only files made since the test began count: pids are reused (pid_max is 32768 on CI's
machines, and threads use pids too), and a file some long-gone process left under one of our pids is not ours.
That was the cause of this file's intermittent failures: a file hours old, "made" by `uname -p` or by p2pd.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest
from shm_files import TreePids, torch_files_of

from farworker.local_mesh import base_env, start_worker
from farworker.shm_cleanup import remove_files_of

CLOSED_API = "http://127.0.0.1:9"  # nothing listens: the worker serves and keeps usage in its outbox


def read_lines_until(proc: subprocess.Popen, prefix: str, lines: list[str], timeout: float) -> None:
    """Collect the demo's output lines into ``lines`` until one starts with ``prefix`` (or the demo ended)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix) or time.monotonic() > deadline:
            return


# Where the SIGTERM lands: "worker1" once it serves, before the demo's request (the run is interrupted); "done"
# while the mesh is being stopped (the stop must not be: a SIGTERM in the workers' drain once skipped the bootstrap
# peer's stop, and it outlived the demo with its /dev/shm file).
@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("signal_at", ["worker1 ", "done in "])
def test_a_sigtermed_demo_stops_its_mesh_and_leaves_no_shm_file(signal_at):
    began = time.time()  # the files this test's processes make are newer
    proc = subprocess.Popen([sys.executable, "-m", "farworker", "demo", "--max-tokens", "4"], env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree = TreePids(proc.pid)
    lines: list[str] = []
    try:
        read_lines_until(proc, signal_at, lines, timeout=180)
        assert lines and lines[-1].startswith(signal_at), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        lines.append(proc.communicate(timeout=90)[0])
    finally:
        pids = tree.close()
        # torch_shm_manager leaves on its own once its last client is gone (seconds): it unlinks their files then
        deadline = time.monotonic() + 15
        while (left_alive := tree.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in left_alive:  # orphans are init's children now: found by what the tree saw
            with contextlib.suppress(psutil.Error):
                process.kill()
    out = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert len(pids) >= 6, pids  # the mesh was up when it was stopped: its processes' files are the ones checked
    assert left_alive == [], "the demo's mesh outlived it"
    assert tree.makers(torch_files_of(pids, since=began)) == {}
    assert "Traceback" not in out, out


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_leaves_nothing_and_a_sigkilled_workers_files_go_at_its_next_start(tmp_path):
    began = time.time()
    handle = start_worker(tmp_path, "w", CLOSED_API, [], "0:4")
    try:
        tree = TreePids(handle.proc.process.pid)
        handle.wait_online()
        time.sleep(1.5)  # one more sample of the tree, and the worker's own record of it (each second)
        assert handle.proc.stop(timeout=60) == 0, handle.proc.log_tail()
        pids = tree.close()
        assert len(pids) > 3, pids  # the worker, its DHT, handlers and p2pd were seen
        assert tree.makers(torch_files_of(pids, since=began)) == {}, "a SIGTERMed worker left files of its tree"

        handle = start_worker(tmp_path, "w", CLOSED_API, [], "0:4")
        tree = TreePids(handle.proc.process.pid)
        handle.wait_online()
        time.sleep(1.5)
        killed = tree.close()
        # SIGKILL to every process of the tree at once, torch_shm_manager too (systemd's final kill of the
        # cgroup, the OOM killer's): no cleanup runs. A surviving manager would unlink its clients' files.
        processes = tree.alive()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(processes, timeout=10)
        handle.proc.process.wait(timeout=10)
        left = torch_files_of(killed, since=began)
        assert left, "the SIGKILLed worker left no file: nothing to show its next start removes them"

        handle = start_worker(tmp_path, "w", CLOSED_API, [], "0:4")
        handle.wait_online()
        assert torch_files_of(killed, since=began) == set(), "the next start did not remove its SIGKILLed run's files"
        assert handle.proc.stop(timeout=60) == 0
    finally:
        handle.proc.kill()
        remove_files_of(killed if "killed" in locals() else set())  # nothing of ours stays if an assert failed
