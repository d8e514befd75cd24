"""Ending the processes petals and hivemind started under us (DHT, p2pd, handlers), within a deadline, and
removing the shared-memory files they leave (shm_cleanup)."""

from __future__ import annotations

import contextlib
import logging


def end_children(timeout: float = 5.0) -> None:
    """Stop any process petals or hivemind left behind, so the worker's exit is bounded.

    Seen once in docker: "Stopped cleanly", then the interpreter's exit waited on a leftover child until
    docker's SIGKILL. And after `farworker coordinator` stopped, its petals client's DHT process and p2pd
    lived on, reparented to init. systemd would kill the cgroup anyway; docker and a shell would not.
    """
    import psutil

    from farworker.shm_cleanup import tracker

    shm = tracker()
    shm.snapshot()  # the pids of the children about to end: their files are removed below
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=1.0)  # SIGKILL is not refused; a second at most for the kernel to reap
    removed = shm.finish()
    if removed:
        logging.getLogger(__name__).info("Removed %d shared-memory files of this process tree", removed)
