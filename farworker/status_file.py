"""The running worker's status, kept in a JSON file in the state dir for `farworker status` and docker's
HEALTHCHECK. Written atomically (rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path

FILE_NAME = "status.json"
PAGE = 4096
STALE_AFTER = 90.0  # seconds without an update before a reader treats the worker as not running


def status_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def write_status(state_dir: Path, status: dict) -> None:
    path = status_path(state_dir)
    text = json.dumps({**status, "updated_at": time.time()}, indent=1, default=str)
    text += " " * (-len(text) % PAGE)  # whole pages (JSON allows trailing blanks): see the in-place rewrite below
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno != errno.ENOSPC:
            raise
        # A full state dir: rewrite the file in place, within the pages it already has, so `farworker status`
        # still says what the worker does (a reader may catch it half-written once: read_status gives None).
        with open(path, "r+b") as file:
            data = text.encode()
            if len(data) > os.fstat(file.fileno()).st_size:
                raise
            file.write(data)
            file.truncate(len(data))


def read_status(state_dir: Path) -> dict | None:
    try:
        return json.loads(status_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


def is_fresh(status: dict, now: float | None = None) -> bool:
    return (now or time.time()) - float(status.get("updated_at", 0)) < STALE_AFTER
