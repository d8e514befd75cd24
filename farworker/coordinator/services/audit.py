"""Session audits: the coordinator recomputes whole server sessions it routed, every position, and a worker whose
answers differ anywhere (a skipped or noisy decode step, not only the prefill) is quarantined like a failed probe.

- ``audit_session``: the rule, a plain function. The capture (farworker/session_capture.py) holds every hidden
  state the coordinator's client sent to one server session and every one it got back, in position order (a
  re-routed session replays its history on its first step; steps of several positions count position by
  position). The worker's span is recomputed over the whole input sequence in ONE forward pass with a fresh cache
  (the way TOPLOC validates a generation with one prefill), and every position is compared with the probes'
  rule: the L2 error relative to the span's own update at that position, against the worker's registered
  precision's tolerance x sqrt(blocks) (spot_check.span_tolerance).
- ``AuditSampler``: which server sessions are audited, from a secret the worker never sees (docs/trust.md,
  "Session audits": the share, the higher share for new and borderline workers, the escape probability).
- ``SessionAudits``: runs audits off the request path, one at a time, with a bounded queue; every audit asked for
  ends counted as passed, failed, dropped (queue full or over the capture memory budget) or unverifiable.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from prometheus_client import Gauge

from farworker.coordinator.services.check_queue import CheckQueue
from farworker.coordinator.spot_check import ProbeResult, record_verdict, span_tolerance
from farworker.session_capture import CaptureBudget, SessionCapture

log = logging.getLogger("farworker.coordinator")

DEFAULT_AUDIT_SHARE = 0.05  # --audit-share: server sessions audited of a worker past its first ones
NEW_WORKER_SESSIONS = 20  # a worker's first server sessions (since the coordinator started) ...
RAISED_SHARE = 0.5  # ... and those of a worker that came near its tolerance are audited at this share
NEAR_TOLERANCE = 0.5  # a passed audit whose worst error reached this share of the tolerance is "near"
RECENT_AUDITS = 5  # a worker is borderline while one of its last audits was near its tolerance
DEFAULT_CAPTURE_BUDGET = 512 * 2**20  # bytes of hidden states captures may hold at once
MAX_QUEUED = 4  # audits waiting beside the one in progress


@dataclass(frozen=True)
class AuditResult:
    peer_id: str
    span: tuple[int, int]
    session_id: str
    positions: int
    worst_position: int | None
    error: float | None  # the worst position's relative error; None: no comparable answer
    tolerance: float
    problem: str | None  # why the audit failed (None: passed)
    cpu_s: float = 0.0  # the recomputation's CPU time in the auditing thread

    @property
    def passed(self) -> bool:
        return self.problem is None

    def as_probe(self) -> ProbeResult:
        """The verdict as the probes record it (tokens 0: the route already attests the work)."""
        return ProbeResult(self.span[0], 0, self.error, self.tolerance, self.problem)


def position_errors(sent, expected, answered):
    """Per position, the probes' rule: ||answered - expected|| / ||expected - sent||, the error relative to the
    span's own update at that position (not to its output: the residual stream would hide a wrong update).
    Tensors are [batch, positions, hidden]; returns [positions], the worst row of each."""
    update = (expected - sent).norm(dim=-1).clamp_min(1e-12)
    return ((answered.float() - expected).norm(dim=-1) / update).amax(dim=0)


def audit_session(capture: SessionCapture, reference, tolerance: float) -> AuditResult:
    """Recompute ``capture``'s span over its whole input sequence at once (``reference(span, hidden)``: the
    coordinator's float32 blocks, a fresh cache) and compare every position."""
    import torch

    started = time.thread_time()
    start, end = capture.span
    what = f"audited session {capture.session_id}: blocks {start}:{end}"
    sent, answered = capture.sequence()
    sent = sent.float()
    expected = reference(capture.span, sent)
    positions = sent.shape[1]
    if answered.shape != expected.shape or not torch.isfinite(answered).all():
        return AuditResult(capture.peer_id, capture.span, capture.session_id, positions, None, None, tolerance,
                           f"{what} returned shape {tuple(answered.shape)} or non-finite values",
                           time.thread_time() - started)
    errors = position_errors(sent, expected, answered)
    worst = int(errors.argmax())
    error = float(errors[worst])
    problem = None
    if error > tolerance:
        problem = (f"{what} activations differ from the reference at position {worst} of {positions}: "
                   f"relative error {error:.3g} > {tolerance:g}")
    return AuditResult(capture.peer_id, capture.span, capture.session_id, positions, worst, error, tolerance,
                       problem, time.thread_time() - started)


class AuditSampler:
    """Chooses the server sessions to audit as petals opens them: HMAC-SHA256 of the server session's id under a
    secret drawn when the coordinator starts, read as a number in [0, 1), under the worker's share. The worker
    never sees the secret, and the coordinator's client does nothing a worker can observe differently for an
    audited session (it keeps copies of tensors it has anyway).

    A worker's share is ``share``, or RAISED_SHARE for its first NEW_WORKER_SESSIONS server sessions and while
    one of its last RECENT_AUDITS audits came within NEAR_TOLERANCE of its tolerance."""

    def __init__(self, share: float = DEFAULT_AUDIT_SHARE, secret: bytes | None = None):
        if not 0 <= share <= 1:
            raise ValueError(f"audit_share: must be between 0 and 1, got {share}")
        self.share = share
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._sessions: dict[str, int] = collections.Counter()  # peer id -> server sessions seen
        self._recent: dict[str, collections.deque] = {}  # peer id -> worst error / tolerance of recent audits

    def share_for(self, peer_id: str) -> float:
        with self._lock:
            new = self._sessions[peer_id] < NEW_WORKER_SESSIONS
            near = any(ratio >= NEAR_TOLERANCE for ratio in self._recent.get(peer_id, ()))
        return max(self.share, RAISED_SHARE) if (new or near) and self.share > 0 else self.share

    def chosen(self, peer_id: str, session_id: str) -> bool:
        share = self.share_for(peer_id)
        with self._lock:
            self._sessions[peer_id] += 1
        draw = hmac.new(self._secret, session_id.encode(), hashlib.sha256).digest()
        return int.from_bytes(draw[:8], "big") / 2**64 < share

    def observe(self, result: AuditResult) -> None:
        """A finished audit's worst error, against the worker's tolerance: a borderline worker is audited more."""
        if result.error is None:
            return
        with self._lock:
            recent = self._recent.setdefault(result.peer_id, collections.deque(maxlen=RECENT_AUDITS))
            recent.append(result.error / result.tolerance)


class SessionAudits(CheckQueue):
    """The coordinator's audits of whole sessions: the mesh client asks ``watch(peer_id, span, session_id)`` as
    petals opens each server session (a SessionCapture for those chosen, else None) and hands the request's
    captures to ``submit()`` when it is done; ``submit`` never waits. One audit runs at a time in this object's
    thread, ``max_queued`` wait; beyond, or over the capture memory budget, an audit is dropped and counted.
    A failed audit quarantines the worker through record_verdict, the probes' path."""

    OUTCOMES = ("chosen", "passed", "failed", "dropped", "dropped_memory", "unverifiable")

    def __init__(self, checker, store, sampler: AuditSampler, *, budget_bytes: int = DEFAULT_CAPTURE_BUDGET,
                 max_queued: int = MAX_QUEUED, registry=None):
        super().__init__(max_queued=max_queued, thread_name="session-audits", registry=registry,
                         metric="farworker_coordinator_session_audits",
                         description="Server sessions chosen for an audit of every position, and how each ended: "
                         "passed; failed (quarantined); dropped (the queue was full); dropped_memory (over the "
                         "capture memory budget); unverifiable (unknown or quarantined worker, deep prompts, beam "
                         "reorder, recomputation failed)")
        self.checker, self.store, self.sampler = checker, store, sampler
        self.budget = CaptureBudget(budget_bytes)
        self.cpu_s = 0.0  # CPU time of every audit's recomputation so far
        Gauge("farworker_coordinator_audit_capture_bytes", "Bytes of hidden states held by session captures",
              registry=registry).set_function(lambda: self.budget.held)

    def watch(self, peer_id: str, span: tuple[int, int], session_id: str) -> SessionCapture | None:
        if not self.sampler.chosen(peer_id, session_id):
            return None
        self._count("chosen")
        return SessionCapture(peer_id, tuple(span), session_id, self.budget)

    def submit(self, captures: list[SessionCapture]) -> None:
        for capture in captures:
            if capture.over_budget:
                self._count("dropped_memory")
            elif capture.problem is not None or not capture.steps:
                capture.release()
                self._count("unverifiable")
            else:
                if not self._offer(capture):
                    capture.release()
                    self._count("dropped")

    def view(self, worker_id: str) -> dict:
        """For GET /v1/workers: this worker's sessions audited since the coordinator started."""
        counts = self.worker_counts(worker_id)
        return {"sessions_audited": counts.get("passed", 0) + counts.get("failed", 0),
                "sessions_audit_failed": counts.get("failed", 0)}

    def _done(self, capture: SessionCapture) -> None:
        capture.release()

    def _check(self, capture: SessionCapture) -> None:
        worker_id = self.store.worker_by_peer(capture.peer_id)
        row = self.store.worker_row(worker_id) if worker_id else None
        if row is None or self.store.quarantine_of(worker_id):
            self._count("unverifiable")
            return
        tolerance = span_tolerance(row["torch_dtype"], row["quant_type"], capture.span[1] - capture.span[0])
        result = audit_session(capture, self.checker.reference_output, tolerance)
        with self._lock:
            self.cpu_s += result.cpu_s
        self.sampler.observe(result)
        if result.passed:
            log.debug("audit of worker %s, blocks %d:%d, %d positions: worst error %.3g at %s (tolerance %g)",
                      worker_id, *capture.span, result.positions, result.error, result.worst_position, tolerance)
            self._count("passed", worker_id=worker_id)
            return
        record_verdict(self.store, self.checker.mesh, worker_id, result.as_probe(), wrong=True)
        self._count("failed", worker_id=worker_id)
