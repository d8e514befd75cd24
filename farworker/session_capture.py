"""Whole server sessions, as the coordinator's client saw them: for an audited session, every hidden state the
client sent to the server session and every one it got back, position by position, so the coordinator can
recompute the worker's span over the whole sequence afterwards (coordinator/services/audit.py).

Captures hold tensors the size of the session's sequence; the memory they hold is bounded by a CaptureBudget.
A capture that would go over it lets go of its tensors and says why (``problem``); the audit it was for is then
counted as dropped, never silently skipped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class CaptureBudget:
    """Bytes that captures may hold at once, across every request in flight and every audit waiting."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def take(self, size: int) -> bool:
        with self._lock:
            if self._held + size > self.max_bytes:
                return False
            self._held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._held = max(0, self._held - size)


@dataclass
class SessionCapture:
    """One server session of one request: its worker and span, and its steps in order, each as the first position
    it covered, the hidden states sent (``[batch, positions, hidden]``) and those returned."""

    peer_id: str
    span: tuple[int, int]
    session_id: str
    budget: CaptureBudget = field(repr=False)
    steps: list[tuple[int, object, object]] = field(default_factory=list, repr=False)
    held_bytes: int = 0
    problem: str | None = None  # why this session cannot be audited (its tensors are let go)
    over_budget: bool = False  # the reason was the memory budget: its audit is dropped, not unverifiable

    def add(self, position: int, sent, returned, plain: bool) -> None:
        """One step of the server session; ``plain``: no deep prompts and no beam reorder (petals would change
        the span's computation or its cache on the server: not recomputable from the hidden states alone)."""
        if self.problem is not None:
            return
        if not plain:
            return self.give_up("a step with deep prompts or a beam reorder")
        expected = sum(step[1].shape[1] for step in self.steps)
        if position != expected or sent.shape != returned.shape:
            return self.give_up(f"a step at position {position} after {expected} positions, or of another shape")
        size = (sent.numel() * sent.element_size()) + (returned.numel() * returned.element_size())
        if not self.budget.take(size):
            self.over_budget = True
            return self.give_up(f"over the capture memory budget ({self.budget.max_bytes} bytes)")
        self.held_bytes += size
        self.steps.append((position, sent.detach().clone(), returned.detach().clone()))

    def give_up(self, problem: str) -> None:
        self.problem = problem
        self.release()

    def release(self) -> None:
        """Let go of the tensors and give their bytes back (after the audit, or when it is dropped)."""
        self.steps = []
        self.budget.give_back(self.held_bytes)
        self.held_bytes = 0

    @property
    def positions(self) -> int:
        return sum(step[1].shape[1] for step in self.steps)

    def sequence(self):
        """(sent, returned) over every position of the session, each ``[batch, positions, hidden]``."""
        import torch

        return (torch.cat([step[1] for step in self.steps], dim=1),
                torch.cat([step[2] for step in self.steps], dim=1))
