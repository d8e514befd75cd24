"""Remove the /dev/shm files a farworker process tree made, once the processes that made them are gone.

torch leaves a shared-memory file behind for each process that is terminated while holding one
(petals/shm_files.py): a demo run left 22, one per handler and DHT process plus two per worker. Each file
names its creating pid, so a process tree cleans up after itself by remembering its pids: a tracker thread
notes the tree's pids while it runs, and at the end (process_tree.end_children, or the interpreter's exit)
the files of those pids are removed. A file whose pid is alive is never removed, except the exiting
process's own. With a record file (the worker's state dir), the pids are kept on disk too, so a worker
that was SIGKILLed has its leftovers removed by its next start.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
from pathlib import Path

from farworker.petals.shm_files import SHM_DIR, files_by_pid

log = logging.getLogger(__name__)

RECORD_NAME = "shm-pids.json"  # next to status.json in the worker's state dir
TRACK_PERIOD = 1.0  # seconds between snapshots: handlers and the DHT live for the whole serve


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remove_files_of(pids: set[int], shm_dir: Path = SHM_DIR, own_pid: int | None = None) -> int:
    """Remove torch's files created by ``pids`` whose process is gone (or is ``own_pid``, exiting now).
    Returns how many were removed."""
    removed = 0
    for pid, paths in files_by_pid(shm_dir).items():
        if pid not in pids or (pid != own_pid and _alive(pid)):
            continue
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def read_record(record: Path) -> set[int]:
    try:
        return {int(pid) for pid in json.loads(record.read_text())}
    except (OSError, ValueError, TypeError):
        return set()


def remove_previous(record: Path, shm_dir: Path = SHM_DIR) -> int:
    """At a start: remove what the last run's tree left (it was SIGKILLed, or its cleanup did not finish)."""
    removed = remove_files_of(read_record(record), shm_dir)
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
    if removed:
        log.info("Removed %d shared-memory files left in %s by this worker's previous run", removed, shm_dir)
    return removed


class TreeTracker:
    """Notes this process's pid and its descendants' while it runs; removes their files at the end."""

    def __init__(self, shm_dir: Path = SHM_DIR):
        self.shm_dir = shm_dir
        self.pids: set[int] = {os.getpid()}
        self.record: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="shm-tracker", daemon=True)
            self._thread.start()
            atexit.register(self.finish)

    def keep_record(self, record: Path) -> None:
        """Remove what the last run recorded in ``record`` left, then record this tree's pids there."""
        remove_previous(record, self.shm_dir)
        self.record = record
        self._write()

    def snapshot(self) -> None:
        import psutil

        try:
            children = {child.pid for child in psutil.Process().children(recursive=True)}
        except psutil.Error:
            return
        with self._lock:
            new = children - self.pids
            self.pids |= new
        if new:
            self._write()

    def finish(self) -> int:
        """After the children ended: remove the files of every pid the tree had. Returns how many."""
        self._stop.set()
        with self._lock:
            pids = set(self.pids)
        removed = remove_files_of(pids, self.shm_dir, own_pid=os.getpid())
        if self.record is not None and not any(_alive(pid) for pid in pids - {os.getpid()}):
            with contextlib.suppress(FileNotFoundError):
                self.record.unlink()
        return removed

    def _write(self) -> None:
        if self.record is None:
            return
        with self._lock:
            pids = sorted(self.pids)
        tmp = self.record.with_name(f".{RECORD_NAME}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(pids))
            tmp.replace(self.record)
        except OSError as error:  # a full state dir: the exit cleanup still works from memory
            log.warning("Could not record this worker's pids in %s: %s", self.record, error)

    def _loop(self) -> None:
        while not self._stop.wait(TRACK_PERIOD):
            self.snapshot()


_tracker: TreeTracker | None = None


def tracker() -> TreeTracker:
    """This process's tracker, started on first use (one per process)."""
    global _tracker
    if _tracker is None:
        _tracker = TreeTracker()
        _tracker.start()
    return _tracker
