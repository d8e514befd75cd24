"""The running worker's status, kept in a JSON file in the state dir for `farworker status` and docker's
HEALTHCHECK. Written atomically (rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FILE_NAME = "status.json"
STALE_AFTER = 90.0  # seconds without an update before a reader treats the worker as not running


def status_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def write_status(state_dir: Path, status: dict) -> None:
    path = status_path(state_dir)
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps({**status, "updated_at": time.time()}, indent=1, default=str))
    tmp.replace(path)


def read_status(state_dir: Path) -> dict | None:
    try:
        return json.loads(status_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


def is_fresh(status: dict, now: float | None = None) -> bool:
    return (now or time.time()) - float(status.get("updated_at", 0)) < STALE_AFTER
