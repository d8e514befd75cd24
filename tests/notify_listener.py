"""A real sd_notify socket for tests: every datagram `farworker` sends, with its arrival time."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


class NotifyListener:
    """A real sd_notify socket: every datagram with its arrival time (monotonic)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fw-notify-", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def fields(self, key: str) -> list[tuple[float, str]]:
        """(time, value) of every `KEY=value` line received."""
        return [
            (at, line[len(key) + 1 :])
            for at, message in list(self.messages)
            for line in message.splitlines()
            if line.startswith(key + "=")
        ]

    def times(self, key: str, value: str) -> list[float]:
        """Arrival times of every `KEY=value` line."""
        return [at for at, got in self.fields(key) if got == value]

    def wait_for(self, key: str, value: str | None, timeout: float, proc: subprocess.Popen | None = None,
                 log: Path | None = None) -> float:
        """Arrival time of the first `KEY=value` (any value if None); fails early if `proc` exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, got in self.fields(key):
                if value is None or got == value:
                    return at
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"worker exited {proc.returncode} before {key}:\n{tail(log)}")
            time.sleep(0.1)
        raise AssertionError(f"no {key}={value} within {timeout:.0f} s; last: {self.messages[-5:]}\n{tail(log)}")

    def close(self):
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        shutil.rmtree(self.dir, ignore_errors=True)


def tail(log: Path | None, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log else ""
    except OSError:
        return ""
