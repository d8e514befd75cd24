"""systemd's notify protocol (sd_notify), through the sdnotify library.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the same code runs in a shell, in docker
and under systemd.
"""

from __future__ import annotations

import logging
import os
import threading

import sdnotify

log = logging.getLogger("farworker")


class Notifier:
    def __init__(self):
        self._socket = sdnotify.SystemdNotifier()
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC", "")
        # systemd asks for a ping at least every WATCHDOG_USEC; pinging at half of it is its advice.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    def _send(self, message: str) -> None:
        if self.enabled:
            self._socket.notify(message)

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self, status: str = "draining") -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


class StartupKeepalive:
    """While a long step runs (download, loading weights), keep extending systemd's start timeout.

    Every `period` seconds: STATUS (e.g. download progress) and EXTEND_TIMEOUT_USEC granting `grant`
    seconds more (at least 3 periods), so a 70B download never hits TimeoutStartSec, while a process that
    stops pinging (hung, GIL held for long) still times out `grant` seconds later.

    A start can also hang without holding the GIL (a DHT join or a child process that never answers):
    `stuck()` returns why once the current step has made no progress for longer than its budget. Then the
    extensions stop, so systemd's start timeout ends the attempt and Restart= tries again; where nothing
    enforces a start timeout (docker, a shell), `give_up(reason)` runs `grant` seconds later.
    """

    def __init__(self, notifier: Notifier, describe, period: float = 2.0, grant: float = 30.0,
                 stuck=lambda: None, give_up=None):
        self._notifier, self._describe, self._period = notifier, describe, period
        self._grant = max(grant, 3 * period)
        self._stuck, self._give_up = stuck, give_up
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="startup-keepalive", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            reason = self._stuck()
            if reason:
                self._notifier.status(f"start stuck: {reason}")
                log.error("Start stuck: %s; no more start-timeout extensions, so the service is restarted", reason)
                if not self._stop.wait(self._grant) and self._give_up is not None:
                    self._give_up(reason)
                return
            self._notifier.extend_timeout(self._grant)
            self._notifier.status(self._describe())
            if self._stop.wait(self._period):
                return
