"""The /dev/shm files that a test's own processes made, and nobody else's.

Other programs run beside the tests (CI shares machines), and they make torch files too: a test never compares
the whole machine's /dev/shm. torch names every shared-memory file it creates "/torch_<pid>_<random>_<counter>"
with the creating process's pid (ATen's NewProcessWideShmHandle: the format string "/torch_{}_{}_{}" in
libtorch_cpu, filled with getpid(), a random number and a per-process counter), so the pids of the processes a
test started tell which files are theirs.
"""

from __future__ import annotations

import os
import threading

import psutil

from farworker.petals.shm_files import creator_pid

SHM_DIR = "/dev/shm"
CTIME_SLACK_S = 1.0  # tmpfs times are coarse: a file made just after ``since`` may read a little before it


def torch_files_of(pids, since: float | None = None) -> set[str]:
    """Names of the torch files in /dev/shm created by one of ``pids``; with ``since`` (a time.time()), only
    those made from then on: pids are reused, and a file a long-gone process left under one of our pids is
    not ours (seen: a file 3 hours old under the pid of a worker's child)."""
    earliest = None if since is None else since - CTIME_SLACK_S
    prefixes = tuple(f"torch_{pid}_" for pid in pids)
    if not prefixes:
        return set()
    try:
        return {entry.name for entry in os.scandir(SHM_DIR)
                if entry.name.startswith(prefixes) and (earliest is None or _changed_at(entry) >= earliest)}
    except FileNotFoundError:  # no /dev/shm: no file anywhere; any other error must not read as "nothing left"
        return set()


def _changed_at(entry: os.DirEntry) -> float:
    try:
        return entry.stat().st_ctime
    except FileNotFoundError:  # removed meanwhile
        return float("-inf")


def _command(process: psutil.Process) -> str:
    try:
        return f"{' '.join(process.cmdline())[-100:]} (parent {process.ppid()})"
    except psutil.Error:
        return "?"


class TreePids:
    """Every pid seen in a process's tree (the process and all its descendants) from now until it exits or
    ``close()``: children come and go, so the tree is sampled, not read once. ``commands`` keeps what each pid
    ran when first seen, so an assertion can name the process behind a leftover file; ``processes`` keeps each as
    psutil saw it (with its start time), so a pid reused by someone else's process is never taken for ours."""

    def __init__(self, root_pid: int, period: float = 0.2):
        self.root_pid = root_pid
        self.commands: dict[int, str] = {root_pid: "the tree's root"}
        self._root = psutil.Process(root_pid)  # remembers its start time: a reused pid is not taken for it
        self.processes: dict[int, psutil.Process] = {root_pid: self._root}
        self._period = period
        self._stop = threading.Event()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="tree-pids", daemon=True)
        self._thread.start()

    def sample(self) -> set[int]:
        try:
            if self._root.is_running():
                for child in self._root.children(recursive=True):
                    if child.pid not in self.processes:
                        self.processes[child.pid] = child
                        self.commands[child.pid] = _command(child)
            else:  # the root has exited: nothing more to see
                self._stop.set()
        except psutil.Error:
            self._stop.set()
        return self.pids

    @property
    def pids(self) -> set[int]:
        return set(self.processes)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.sample()

    def close(self) -> set[int]:
        self._stop.set()
        self._thread.join(5)
        return self.pids

    def makers(self, names: set[str]) -> dict[str, str]:
        """Each of ``names`` (torch files), and what the pid that made it ran."""
        return {name: self.commands.get(creator_pid(name), "?") for name in names}

    def alive(self) -> list[psutil.Process]:
        """The tree's processes still running (a zombie has ended; its parent has not reaped it yet)."""
        return [process for process in self.processes.values() if _running(process)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
