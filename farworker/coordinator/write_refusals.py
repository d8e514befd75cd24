"""Whether the ledger database refuses writes now (its disk is full): said once in the log when it starts and once
when it ends, whichever request or background loop met it, and exported to /metrics for operators.

A nearly full disk flaps: SQLite reuses the WAL's pages after a checkpoint, so a few writes go through between
refusals. A spell of refusals therefore ends only once writes have gone through for SETTLE_S with none refused:
one line each way per spell, not one per flap.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("farworker.coordinator")

SETTLE_S = 10.0


class WriteRefusals:
    def __init__(self):
        self.since: float | None = None  # unix s of the first refusal of the current spell, None while writable
        self.refused_total = 0
        self._last_refused = 0.0  # monotonic
        self._lock = threading.Lock()
        self._counter: Counter | None = None

    @property
    def refusing(self) -> bool:
        return self.since is not None

    def refused(self, reason: str) -> None:
        with self._lock:
            self.refused_total += 1
            self._last_refused = time.monotonic()
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
            if self.since is None or time.monotonic() - self._last_refused < SETTLE_S:
                return
            since, self.since = self.since, None
        log.warning("the ledger database accepts writes again (after %.0f s; %d writes refused in all)",
                    time.time() - since, self.refused_total)

    def export(self, registry: CollectorRegistry) -> None:
        Gauge("farworker_coordinator_store_refusing_writes",
              f"1 while the ledger database refuses writes (disk full; until writes went through for {SETTLE_S:g} s)",
              registry=registry).set_function(lambda: 1.0 if self.refusing else 0.0)
        self._counter = Counter("farworker_coordinator_store_refused_writes",
                                "Writes the ledger database refused for want of space", registry=registry)
