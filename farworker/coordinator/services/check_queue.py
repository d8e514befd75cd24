"""CheckQueue: verifications run one at a time off the request path, in a bounded queue, every outcome counted.

Routed first-step checks (spot_check.RoutedChecks) and whole-session audits (services/audit.SessionAudits) share
it: ``offer`` never waits (a full queue refuses, and the caller counts the drop), a verification that raises
never ends the thread, and ``stop`` is bounded by the one verification in progress.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

from prometheus_client import Counter

from farworker.coordinator.errors import StoreFull

log = logging.getLogger("farworker.coordinator")


class CheckQueue:
    OUTCOMES: tuple[str, ...] = ()  # every outcome a subclass counts; each shows in /metrics from the start, at 0

    def __init__(self, *, max_queued: int, thread_name: str, metric: str, description: str, registry=None):
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.OUTCOMES, 0)
        self._per_worker: dict[str, dict[str, int]] = {}
        self._counter = Counter(metric, description, ["outcome"], registry=registry)
        for outcome in self.OUTCOMES:
            self._counter.labels(outcome)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._queue.put_nowait(None)  # wake the thread; with a full queue it is busy and sees the flag next
        self._thread.join(timeout)

    def worker_counts(self, worker_id: str) -> dict[str, int]:
        with self._lock:
            return dict(self._per_worker.get(worker_id, {}))

    def _offer(self, item) -> bool:
        """Queue ``item`` without waiting; False when the queue is full (the caller counts it as dropped)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _count(self, *outcomes: str, worker_id: str | None = None) -> None:
        with self._lock:
            for outcome in outcomes:
                self.counts[outcome] += 1
                if worker_id is not None:
                    per_worker = self._per_worker.setdefault(worker_id, {})
                    per_worker[outcome] = per_worker.get(outcome, 0) + 1
        for outcome in outcomes:
            self._counter.labels(outcome).inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            try:
                self._check(item)
            except StoreFull:  # its verdict could not be written (disk full; write_refusals said so once)
                self._count("unverifiable")
            except Exception:  # a check must never end the thread (a block that cannot load, a DHT hiccup)
                log.exception("%s: checking a session of %s failed", self._thread.name, getattr(item, "peer_id", "?"))
                self._count("unverifiable")
            finally:
                self._done(item)

    def _check(self, item) -> None:
        raise NotImplementedError

    def _done(self, item) -> None:
        """After each check, however it ended (a subclass frees what the item held)."""
