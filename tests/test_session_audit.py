"""The session audit's rule without HTTP or processes: real tiny-model blocks in this process (the coordinator's
own reference path, SpotChecker.reference_output), sessions computed incrementally with transformers' own KV
cache as an honest worker would, then altered as the adversaries alter them."""

from __future__ import annotations

import pytest
import torch

from farworker.coordinator.services.audit import (
    NEW_WORKER_SESSIONS,
    RAISED_SHARE,
    AuditResult,
    AuditSampler,
    SessionAudits,
    audit_session,
)
from farworker.coordinator.spot_check import SpotChecker, span_tolerance
from farworker.session_capture import CaptureBudget, SessionCapture

SPAN = (1, 3)
PROMPT, DECODE = 7, 9
TOLERANCE = span_tolerance("float32", "none", SPAN[1] - SPAN[0])


class CheckpointBlocks:
    """What SpotChecker needs of the mesh to load reference blocks: the blocks of a local checkpoint."""

    def __init__(self, model_path):
        self.model_path = model_path

    def load_block(self, block: int):
        from farworker.petals.compat import import_petals
        from farworker.petals.remote_blocks import load_reference_block

        import_petals()  # as the coordinator's mesh client has done before it loads a block
        return load_reference_block(self.model_path, block, None)  # petals reads the config from the checkpoint


@pytest.fixture(scope="module")
def reference(tiny_model):
    return SpotChecker(CheckpointBlocks(tiny_model)).reference_output


@pytest.fixture(scope="module")
def honest_steps(tiny_model):
    """[(position, sent, returned)] of span SPAN for a prefill of PROMPT tokens and DECODE one-token steps, each
    step computed on transformers' KV cache, not in one pass: what an honest worker returns."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32).eval()
    tokens = torch.randint(3, 500, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(18))
    steps, past, position = [], None, 0
    chunks = [tokens[:, :PROMPT]] + list(tokens[:, PROMPT:].split(1, dim=1))
    with torch.inference_mode():
        for chunk in chunks:
            out = model.model(input_ids=chunk, past_key_values=past, use_cache=True, output_hidden_states=True)
            past = out.past_key_values
            # hidden_states[i] is the input of block i
            steps.append((position, out.hidden_states[SPAN[0]].clone(), out.hidden_states[SPAN[1]].clone()))
            position += chunk.shape[1]
    return steps


def capture_of(steps, budget: CaptureBudget | None = None) -> SessionCapture:
    capture = SessionCapture("peer", SPAN, "session", budget or CaptureBudget(2**30))
    for position, sent, returned in steps:
        capture.add(position, sent, returned, True)
    return capture


def audit(reference, steps) -> AuditResult:
    return audit_session(capture_of(steps), reference, TOLERANCE)


def test_an_honest_session_passes_at_every_position(reference, honest_steps):
    result = audit(reference, honest_steps)
    assert result.passed, result.problem
    assert result.positions == PROMPT + DECODE
    assert result.error < TOLERANCE / 100, result  # float32 cache steps vs one pass: round-off only


def test_decode_steps_returning_their_inputs_fail(reference, honest_steps):
    skipped = honest_steps[:1] + [(p, sent, sent) for p, sent, _ in honest_steps[1:]]
    result = audit(reference, skipped)
    assert not result.passed and result.worst_position >= PROMPT, result
    assert f"position {result.worst_position} of {PROMPT + DECODE}" in result.problem
    assert result.as_probe().problem == result.problem and result.as_probe().tokens == 0


def test_one_percent_noise_on_decode_steps_fails(reference, honest_steps):
    generator = torch.Generator().manual_seed(1)

    def noisy(hidden):
        noise = torch.randn(hidden.shape, generator=generator)
        return hidden + noise / noise.norm(dim=-1, keepdim=True) * hidden.norm(dim=-1, keepdim=True) * 0.01

    result = audit(reference, honest_steps[:1] + [(p, s, noisy(r)) for p, s, r in honest_steps[1:]])
    assert not result.passed and result.worst_position >= PROMPT, result


def test_one_wrong_position_among_many_fails(reference, honest_steps):
    """The worst position decides: one bad decode step in a long session is not averaged away."""
    steps = list(honest_steps)
    position, sent, returned = steps[-3]
    steps[-3] = (position, sent, returned + 0.01 * (returned - sent))  # the update 1 % off at one position
    result = audit(reference, steps)
    assert not result.passed and result.worst_position == position, result


def test_replayed_history_and_multi_position_steps_are_one_sequence(reference, honest_steps):
    """A server session opened by a re-route sends its whole history on its first step; a later step may carry
    several positions. Both are the same positions in order, and an honest session still passes."""
    sent = torch.cat([s for _, s, _ in honest_steps[:4]], dim=1)
    returned = torch.cat([r for _, _, r in honest_steps[:4]], dim=1)
    merged = [(0, sent, returned)]
    tail = honest_steps[4:]
    merged.append((tail[0][0], torch.cat([tail[0][1], tail[1][1]], 1), torch.cat([tail[0][2], tail[1][2]], 1)))
    merged += tail[2:]
    result = audit(reference, merged)
    assert result.passed and result.positions == PROMPT + DECODE, result


def test_a_gap_or_a_plain_less_step_makes_the_session_unauditable(honest_steps):
    capture = capture_of(honest_steps[:2])
    capture.add(honest_steps[3][0], honest_steps[3][1], honest_steps[3][2], True)  # step 2 missing
    assert "position" in capture.problem and not capture.steps and capture.held_bytes == 0
    prompted = capture_of(honest_steps[:1])
    prompted.add(*honest_steps[1], False)
    assert "deep prompts" in prompted.problem


def test_captures_over_the_memory_budget_let_go_and_are_counted(honest_steps):
    from prometheus_client import CollectorRegistry

    prefill = sum(t.numel() * t.element_size() for t in honest_steps[0][1:])
    audits = SessionAudits(None, None, AuditSampler(1.0), budget_bytes=2 * prefill, registry=CollectorRegistry())
    big = audits.watch("peer", SPAN, "s1")
    for position, sent, returned in honest_steps:
        big.add(position, sent, returned, True)
    assert big.over_budget and big.problem.startswith("over the capture memory budget")
    assert audits.budget.held == 0  # what it held is given back
    small = audits.watch("peer", SPAN, "s2")
    small.add(*honest_steps[0], True)
    assert audits.budget.held == small.held_bytes > 0
    audits.submit([big, small])  # the thread is not started: small waits in the queue
    assert audits.counts["dropped_memory"] == 1 and audits.counts["chosen"] == 2


def test_audits_beyond_the_queue_are_dropped_and_counted_without_waiting(honest_steps):
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    audits = SessionAudits(None, None, AuditSampler(1.0), max_queued=2, registry=registry)
    captures = []
    for n in range(5):
        capture = audits.watch("peer", SPAN, f"s{n}")
        capture.add(*honest_steps[0], True)
        captures.append(capture)
    audits.submit(captures)  # returns at once: nobody audits here, a blocking put would hang
    assert audits.counts["dropped"] == 3, audits.counts
    assert audits.budget.held == sum(c.held_bytes for c in captures[:2])  # the dropped ones let go
    assert 'farworker_coordinator_session_audits_total{outcome="dropped"} 3.0' in generate_latest(registry).decode()


def test_the_sampler_draws_the_share_from_a_secret():
    sampler = AuditSampler(0.05, secret=b"s" * 32)
    sessions = [f"session-{n}" for n in range(20_000)]
    first = [sampler.chosen("new", s) for s in sessions[:NEW_WORKER_SESSIONS]]
    later = [sampler.chosen("new", s) for s in sessions[NEW_WORKER_SESSIONS:]]
    assert 0.2 < sum(first) / len(first) < 0.8  # a new worker's first sessions: RAISED_SHARE
    assert 0.04 < sum(later) / len(later) < 0.06
    # another secret chooses other sessions: a worker cannot compute which of its sessions are audited
    other = AuditSampler(0.05, secret=b"t" * 32)
    other._sessions["new"] = NEW_WORKER_SESSIONS
    overlap = sum(a and other.chosen("new", s) for a, s in zip(later, sessions[NEW_WORKER_SESSIONS:], strict=True))
    assert overlap < 0.2 * sum(later)
    assert not any(AuditSampler(0.0).chosen("w", s) for s in sessions[:1000])


def test_a_worker_near_its_tolerance_is_audited_more():
    sampler = AuditSampler(0.05)
    sampler._sessions["w"] = NEW_WORKER_SESSIONS  # past its first sessions
    assert sampler.share_for("w") == 0.05
    sampler.observe(AuditResult("w", SPAN, "s", 3, 0, 0.4e-3, 1e-3, None))
    assert sampler.share_for("w") == 0.05
    sampler.observe(AuditResult("w", SPAN, "s", 3, 0, 0.6e-3, 1e-3, None))  # within 0.5x of the tolerance
    assert sampler.share_for("w") == RAISED_SHARE
    for _ in range(5):  # five audits far from it later, it is back at the base share
        sampler.observe(AuditResult("w", SPAN, "s", 3, 0, 1e-6, 1e-3, None))
    assert sampler.share_for("w") == 0.05
    with pytest.raises(ValueError, match="audit_share"):
        AuditSampler(1.5)
