"""A farworker process tree leaves nothing in /dev/shm: after a demo, after a SIGTERM, and (at the next start)
after a SIGKILL. Each test owns only the files its processes made: torch names each file with the creating
pid (farworker/petals/shm_files.py), and the tests collect their processes' pids, whole trees, while they run.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from farworker.local_mesh import base_env, start_worker
from farworker.petals.shm_files import creator_pid, files_by_pid
from farworker.shm_cleanup import remove_files_of

CLOSED_API = "http://127.0.0.1:9"  # nothing listens: the worker serves and keeps usage in its outbox


class TreePids:
    """The pids of a process and all its descendants, sampled every 0.1 s until stopped; ``seen`` says what each
    was (its command line and parent), so a leftover file names the process that made it."""

    def __init__(self, pid: int):
        self.pids = {pid}
        self.seen: dict[int, str] = {pid: "the root"}
        self._root = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                children = psutil.Process(self._root).children(recursive=True)
            except psutil.Error:
                return
            for child in children:
                if child.pid not in self.pids:
                    self.pids.add(child.pid)
                    with contextlib.suppress(psutil.Error):
                        self.seen[child.pid] = f"{' '.join(child.cmdline())[-80:]} (parent {child.ppid()})"

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.pids


def running(pid: int) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.Error:
        return None


def files_of(pids: set[int]) -> list[Path]:
    return [path for pid, paths in files_by_pid().items() if pid in pids for path in paths]


def makers(files: list[Path], tree: TreePids) -> dict[str, str]:
    """Each leftover file, and what the process that made it was."""
    return {path.name: tree.seen.get(creator_pid(path.name), "?") for path in files}


@pytest.mark.slow
def test_demo_leaves_no_shm_file_of_its_processes():
    proc = subprocess.Popen([sys.executable, "-m", "farworker", "demo", "--max-tokens", "4"], env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree = TreePids(proc.pid)
    out, _ = proc.communicate(timeout=300)
    pids = tree.stop()
    assert proc.returncode == 0, out
    assert len(pids) > 10, pids  # bootstrap, coordinator, workers, their handlers and DHT processes were seen
    assert makers(files_of(pids), tree) == {}


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
        pids = tree.stop()
        # torch_shm_manager leaves on its own once its last client is gone (seconds): it unlinks their files then
        deadline = time.monotonic() + 15
        while (left_alive := [p for p in map(running, pids) if p is not None]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in left_alive:  # orphans are init's children now: found by pid
            process.kill()
    out = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert len(pids) >= 6, pids  # the mesh was up when it was stopped: its processes' files are the ones checked
    assert left_alive == [], "the demo's mesh outlived it"
    assert makers(files_of(pids), tree) == {}
    assert "Traceback" not in out, out


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_leaves_nothing_and_a_sigkilled_workers_files_go_at_its_next_start(tmp_path):
    handle = start_worker(tmp_path, "w", CLOSED_API, [], "0:4")
    try:
        tree = TreePids(handle.proc.process.pid)
        handle.wait_online()
        time.sleep(1.5)  # one more sample of the tree, and the worker's own record of it (each second)
        assert handle.proc.stop(timeout=60) == 0, handle.proc.log_tail()
        pids = tree.stop()
        assert len(pids) > 3, pids  # the worker, its DHT, handlers and p2pd were seen
        assert makers(files_of(pids), tree) == {}, "a SIGTERMed worker left torch_* files of its processes"

        handle = start_worker(tmp_path, "w", CLOSED_API, [], "0:4")
        tree = TreePids(handle.proc.process.pid)
        handle.wait_online()
        time.sleep(1.5)
        killed = tree.stop()
        # SIGKILL to every process of the tree at once, torch_shm_manager too (systemd's final kill of the
        # cgroup, the OOM killer's): no cleanup runs. A surviving manager would unlink its clients' files.
        processes = [psutil.Process(pid) for pid in killed if psutil.pid_exists(pid)]
        for process in processes:
            process.kill()
        psutil.wait_procs(processes, timeout=10)
        handle.proc.process.wait(timeout=10)
        left = files_of(killed)
        assert left, "the SIGKILLed worker left no file: nothing to show its next start removes them"

        handle = start_worker(tmp_path, "w", CLOSED_API, [], "0:4")
        handle.wait_online()
        assert files_of(killed) == [], "the next start did not remove its SIGKILLed run's files"
        assert handle.proc.stop(timeout=60) == 0
    finally:
        handle.proc.kill()
        remove_files_of(killed if "killed" in locals() else set())  # nothing of ours stays if an assert failed
