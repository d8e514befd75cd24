"""Whether the ledger database refuses writes now (its disk is full): said once in the log when it starts and once
when it ends, whichever request or background loop met it, and exported to /metrics for operators."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("farworker.coordinator")


class WriteRefusals:
    def __init__(self):
        self.since: float | None = None  # unix s of the first refusal of the current spell, None while writable
        self.refused_total = 0
        self._lock = threading.Lock()
        self._counter: Counter | None = None

    @property
    def refusing(self) -> bool:
        return self.since is not None

    def refused(self, reason: str) -> None:
        with self._lock:
            self.refused_total += 1
            started, self.since = self.since is None, self.since or time.time()
        if self._counter is not None:
            self._counter.inc()
        if started:  # once per spell: every request and loop round meets it while the disk stays full
            log.error("the ledger database refuses writes (%s): writes are answered 503 until there is space; "
                      "reads go on", reason)

    def accepted(self) -> None:
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            log.warning("the ledger database accepts writes again (refused them for %.0f s)", time.time() - since)

    def export(self, registry: CollectorRegistry) -> None:
        Gauge("farworker_coordinator_store_refusing_writes",
              "1 while the ledger database refuses writes (disk full), else 0",
              registry=registry).set_function(lambda: 1.0 if self.refusing else 0.0)
        self._counter = Counter("farworker_coordinator_store_refused_writes",
                                "Writes the ledger database refused for want of space", registry=registry)
