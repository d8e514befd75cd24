"""The reporter thread: registration, heartbeats and usage flushing; the coordinator's trouble never
becomes the worker's.

Registration retries with capped exponential backoff and full jitter. The worker registers at start,
before it knows everything (its blocks while joining); ``update_registration()`` sends the registration
again, keeping the worker id, when facts arrive. Heartbeats go out every interval (the interval the
coordinator answers wins over the local one), and at once after a registration or ``beat_now()``.
After each beat, and shortly after new usage records arrive, the outbox is flushed in batches; a record
leaves the outbox only when the coordinator acknowledged its id. While the coordinator fails, flushes
triggered by new records wait for the same backoff, so an outage is not met with a request per record.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable

from farworker.api_client import CoordinatorClient, CoordinatorError
from farworker.clock_offset import MAX_OFFSET_S, clock_problem, journal_line
from farworker.outbox import Outbox

log = logging.getLogger("farworker.reporting")

MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 3600.0


def format_rate(rate: float) -> str:
    return f"{rate:.2f}" if rate == 0 or abs(rate) >= 0.01 else f"{rate:.2g}"


def heartbeat_line(payload: dict, answer: dict) -> str:
    """'heartbeat ok: online, blocks 0:2, 12 tokens, earn rate 0.42 $FAR/h';
    'heartbeat ok: joining (loading blocks), no blocks, ...' while joining"""
    blocks = payload.get("blocks")
    span = f"blocks {blocks[0]}:{blocks[1]}" if blocks else "no blocks"
    tokens = payload.get("counters", {}).get("tokens_processed", 0)
    rate = format_rate(float(answer.get("earn_rate_far_per_hour", 0.0)))
    state = payload.get("state", "?") + (f" ({payload['phase']})" if payload.get("phase") else "")
    return (
        f"heartbeat ok: {state}, {span}, {tokens} tokens, earn rate {rate} $FAR/h"
        f" (reliability {float(answer.get('reliability', 0)):.2f})"
    )


class Backoff:
    """Capped exponential backoff with full jitter: the n-th delay is uniform in [cap_n / 2, cap_n],
    cap_n = min(maximum, initial × 2^n)."""

    def __init__(self, initial_s: float, maximum_s: float, rng: Callable[[], float] = random.random):
        self.initial_s, self.maximum_s, self._rng = initial_s, maximum_s, rng
        self.failures = 0

    def next_delay(self) -> float:
        cap = min(self.maximum_s, self.initial_s * (2 ** min(self.failures, 32)))
        self.failures += 1
        return cap / 2 + self._rng() * cap / 2

    def reset(self) -> None:
        self.failures = 0


def next_beat_time(due: float, now: float, interval: float) -> float:
    """The next beat on the grid of the one ``due`` (due + k intervals), the first after ``now``. The coordinator
    counts one beat per interval slot since registration, and the grid starts at the registration's answer, so
    every beat arrives early in its slot. Spacing beats an interval after each one was sent let each beat's delay
    add up: they drifted across the slots' boundaries and missed one slot in every interval/delay."""
    return due + interval * max(1, math.floor((now - due) / interval) + 1)


class Reporter:
    def __init__(
        self,
        client: CoordinatorClient,
        outbox: Outbox,
        registration: Callable[[], dict],
        heartbeat_payload: Callable[[], dict],
        *,
        interval: float = 30.0,
        batch_size: int = 100,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        flush_delay_s: float = 0.2,
        rng: Callable[[], float] = random.random,
    ):
        self.client, self.outbox = client, outbox
        self._registration, self._heartbeat_payload = registration, heartbeat_payload
        self.interval_s = interval
        self.batch_size = batch_size
        self.flush_delay_s = flush_delay_s
        self._register_backoff = Backoff(backoff_initial_s, backoff_max_s, rng)
        self._api_backoff = Backoff(backoff_initial_s, backoff_max_s, rng)
        self._api_retry_at = 0.0  # monotonic; record-triggered flushes wait until then after a failure
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._beat_now = threading.Event()
        self._registration_stale = False  # the registration's facts changed since it was sent
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.worker_id: str | None = None
        self.state = "unregistered"  # unregistered -> registered -> draining -> stopped
        self.last_heartbeat: dict | None = None  # {"at": unix s, "payload": ..., "answer": ...}
        self.last_error: str | None = None
        self.clock_off = False  # the coordinator refused a signed report and the Date header shows why
        self.stats = {
            "register_attempts": 0,
            "heartbeats": 0,
            "heartbeat_failures": 0,
            "records_sent": 0,
            "flush_failures": 0,
        }
        outbox.add_listener(self.notify)

    # --- control ----------------------------------------------------------------------------------------
    def start(self) -> Reporter:
        self._thread = threading.Thread(target=self._run, name="farworker-reporter", daemon=True)
        self._thread.start()
        return self

    def notify(self) -> None:
        """New usage records are in the outbox."""
        self._wake.set()

    def beat_now(self) -> None:
        """Send the next heartbeat now (the worker's state changed), not an interval later."""
        self._beat_now.set()
        self._wake.set()

    def update_registration(self) -> None:
        """The registration's facts changed (the model's size, the blocks, the addresses): register
        again before the next heartbeat, which goes out now. The coordinator keeps the worker id."""
        self._registration_stale = True
        self.beat_now()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread without the final flush or deregistration."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state != "draining":
            self.state = "stopped"

    def drain_and_stop(self, timeout: float = 10.0) -> bool:
        """On SIGTERM: report draining, flush what the coordinator will take, deregister; within ``timeout``.
        True when the outbox is empty and the coordinator heard the deregistration."""
        deadline = time.monotonic() + timeout
        self.state = "draining"
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, min(deadline - time.monotonic(), self.client.timeout + 1)))
            if self._thread.is_alive():
                log.warning(
                    "reporter busy past the drain deadline; usage stays in the outbox for the next start"
                )
                return False
        if self.worker_id is None:
            log.info(
                "not registered with the coordinator; %d usage records stay in the outbox",
                self.outbox.depth(),
            )
            self.state = "stopped"
            return False
        saved_timeout = self.client.timeout
        try:

            def remaining() -> float:
                return deadline - time.monotonic()

            self.client.timeout = max(0.5, min(saved_timeout, remaining()))
            try:
                self._heartbeat(state="draining")
            except CoordinatorError as err:
                log.warning("final heartbeat failed: %s", err)
                return False
            flushed = self._flush(deadline=deadline)
            if remaining() <= 0:
                log.warning(
                    "drain deadline reached; %d usage records stay in the outbox", self.outbox.depth()
                )
                return False
            self.client.timeout = max(0.5, min(saved_timeout, remaining()))
            self.client.deregister(self.worker_id)
            log.info("deregistered from the coordinator; outbox depth %d", self.outbox.depth())
            return flushed and self.outbox.depth() == 0
        except CoordinatorError as err:
            log.warning("drain: %s; usage stays in the outbox for the next start", err)
            return False
        finally:
            self.client.timeout = saved_timeout
            self.state = "stopped"

    def status(self) -> dict:
        """For `farworker status` and /metrics."""
        return {
            "state": self.state,
            "worker_id": self.worker_id,
            "last_heartbeat": self.last_heartbeat,
            "last_error": self.last_error,
            "outbox_depth": self.outbox.depth(),
            "clock_offset_s": self.client.clock_offset,
            **self.stats,
        }

    # --- the loop ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                if self.worker_id is None:
                    if not self._register():
                        self._stop.wait(self._register_backoff.next_delay())
                        continue
                    next_beat = 0.0
                now = time.monotonic()
                if now >= next_beat or self._beat_now.is_set():
                    self._beat_now.clear()
                    if now >= next_beat:  # a beat on the grid; one sent early (beat_now) leaves the grid alone
                        next_beat = next_beat_time(next_beat or now, now, self.interval_s)
                    self._beat_and_flush()
                elif not self._wake.is_set():
                    self._wake.wait(next_beat - now)
                elif now >= self._api_retry_at:
                    self._stop.wait(self.flush_delay_s)  # let a burst of records gather into one batch
                    self._wake.clear()
                    self._flush_logged()
                else:  # records wait, but the coordinator failed lately: hold off until its backoff ends
                    self._stop.wait(min(next_beat, self._api_retry_at) - now)
            except Exception:  # never let a bug here take the worker down; try again later
                log.exception("reporter loop error; retrying in %.0f s", self.interval_s)
                self._stop.wait(self.interval_s)

    def _register(self) -> bool:
        self.stats["register_attempts"] += 1
        again = self.worker_id is not None
        stale, self._registration_stale = self._registration_stale, False  # a change from now on: again
        try:
            answer = self.client.register(self._registration())
        except CoordinatorError as err:
            self._registration_stale = self._registration_stale or stale
            self.last_error = str(err)
            if not self._clock_explains(err):
                log.warning("registration failed: %s; retrying %s", err, "at the next heartbeat" if again
                            else "with backoff")
            return False
        with self._lock:
            self.worker_id = answer["worker_id"]
            self.state = "registered"
        self._set_interval(answer.get("heartbeat_interval"))
        self._register_backoff.reset()
        self.last_error = None
        log.info(
            "%s with the coordinator as %s; heartbeat every %g s",
            "registration updated" if again else "registered", self.worker_id, self.interval_s,
        )
        return True

    def _set_interval(self, value) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            self.interval_s = max(MIN_INTERVAL_S, min(MAX_INTERVAL_S, float(value)))

    def _beat_and_flush(self) -> None:
        """One heartbeat, then a flush; first the registration again if its facts changed (a failure
        leaves it for the next beat: the worker id still stands, so heartbeats go on meanwhile)."""
        if self._registration_stale:
            self._register()
        try:
            self._heartbeat()
        except CoordinatorError as err:
            self.stats["heartbeat_failures"] += 1
            self.last_error = str(err)
            if err.needs_registration:
                log.warning("%s; registering again", err)
                self.worker_id = None
                return
            if not self._clock_explains(err):
                log.warning("heartbeat failed: %s", err)
            self._api_failed()
            return
        self._wake.clear()
        self._flush_logged()

    def _heartbeat(self, state: str | None = None) -> None:
        payload = self._heartbeat_payload()
        if state is not None:
            payload = dict(payload, state=state)
        answer = self.client.heartbeat(self.worker_id, payload)
        self._set_interval(answer.get("heartbeat_interval"))
        self.stats["heartbeats"] += 1
        self.last_heartbeat = {"at": time.time(), "payload": payload, "answer": answer}
        self.last_error = None
        self._api_backoff.reset()
        self._api_retry_at = 0.0
        if self.clock_off:
            self.clock_off = False
            log.info("clock is back within %g s of the coordinator's: signed reports are accepted again",
                     MAX_OFFSET_S)
        if answer.get("quarantined"):  # paid nothing and routed nothing until an operator looks
            log.error("%s; QUARANTINED by the coordinator: %s", heartbeat_line(payload, answer), answer["quarantined"])
        else:
            log.info(heartbeat_line(payload, answer))
        if answer.get("unreachable"):  # clients cannot dial it directly either: it serves little or nothing
            log.warning("%s; check FARLABS_ANNOUNCE_MADDRS, the firewall and port forwarding", answer["unreachable"])

    def _clock_explains(self, err: CoordinatorError) -> bool:
        """A 401 while this host's clock is off: say "clock is N s off" once per change, not each refusal."""
        offset = self.client.clock_offset
        if err.status != 401 or clock_problem(offset) is None:
            return False
        if not self.clock_off:
            self.clock_off = True
            log.error(journal_line(offset))
        return True

    def _api_failed(self) -> None:
        self._api_retry_at = time.monotonic() + self._api_backoff.next_delay()

    def _flush_logged(self) -> None:
        try:
            self._flush()
        except CoordinatorError as err:
            self.stats["flush_failures"] += 1
            self.last_error = str(err)
            if err.needs_registration:
                log.warning("%s; registering again", err)
                self.worker_id = None
            else:
                if not self._clock_explains(err):
                    log.warning(
                        "usage flush failed (%d records wait in the outbox): %s", self.outbox.depth(), err
                    )
                self._api_failed()

    def _flush(self, deadline: float | None = None) -> bool:
        """Send pending records in batches until the outbox is empty (True) or the deadline.
        Raises CoordinatorError."""
        while deadline is None or time.monotonic() < deadline:
            if self._stop.is_set() and deadline is None:
                return False
            batch = self.outbox.pending(self.batch_size)
            if not batch:
                return True
            try:
                accepted = self.client.send_usage(self.worker_id, batch)
            except CoordinatorError as err:
                if err.status not in (400, 413, 422):
                    raise
                self._send_one_by_one(batch)
                continue
            acknowledged = self.outbox.acknowledge(accepted)
            self.stats["records_sent"] += acknowledged
            if acknowledged == 0:
                # the coordinator keeps refusing these ids (another worker's); stop instead of spinning
                raise CoordinatorError(f"usage: the coordinator acknowledged none of {len(batch)} records")
        return self.outbox.depth() == 0

    def _send_one_by_one(self, batch: list[dict]) -> None:
        """A batch was refused as malformed: find the records that are, set them aside, send the rest."""
        for record in batch:
            try:
                accepted = self.client.send_usage(self.worker_id, [record])
            except CoordinatorError as err:
                if err.status not in (400, 413, 422):
                    raise
                log.error("usage record %s refused by the coordinator, set aside: %s", record["id"], err)
                self.outbox.reject(record["id"], str(err))
                continue
            self.stats["records_sent"] += self.outbox.acknowledge(accepted)
