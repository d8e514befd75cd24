"""Spot checks: the coordinator sends a probe of its own to one block of a worker's span, through that worker
alone, and compares the activations it returns with its own computation of the same block.

The coordinator loads only the block it checks (one at a time, the last one kept), so checking a 70B mesh needs
one block's weights, not the model. The probe is random hidden states of the model's width (seeded per probe,
scaled like real activations); the worker runs them through petals' `rpc_forward`. The comparison is the
L2 error relative to the block's own update, ``||worker - reference|| / ||reference - input||``, against a
tolerance for the worker's registered dtype and quantization (`tolerance_for`, derivation in docs/trust.md).
With each probe the coordinator also dials the worker's announced addresses directly
(coordinator/services/reachability.py).

RoutedChecks verifies a sampled share of the completions the coordinator routes the same way, with the client's
real inputs: one server session's first step (its prefill), recomputed through the worker's whole span.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

from farworker.coordinator.errors import StoreFull
from farworker.coordinator.services import probe_order, reachability
from farworker.coordinator.services.check_queue import CheckQueue
from farworker.mesh_client import FirstStep

log = logging.getLogger("farworker.coordinator")

# A worker's addresses are dialled with each probe at the default period (300 s), but not more often than this:
# a dial starts a p2p daemon per address (~0.2 CPU s, benchmarks/probe_cost.py), a probe ~0.03 CPU s.
REDIAL_AFTER_S = 60.0
RECENT_ROUTED_CHECKS = 20  # kept per worker, in memory, for the mesh page (a passed check is stored nowhere else)
PROBE_TOKENS = 8  # sequence length of a probe: a few positions exercise attention and the rotary embedding
# Relative L2 error a correct block stays under, by the precision the worker computes in (docs/trust.md).
# float32: round-off of a float32 block against a float32 reference is ~1e-6 (measured on the tiny Llama);
# half precision ~1e-3 per block (unit round-off 4.9e-4 / 3.9e-3 for fp16 / bf16, accumulated over the
# block's matmuls); 8-bit and 4-bit weights add their quantization error.
# int8 (LLM.int8, bitsandbytes on CPU, float32 activations) is measured: honest error 7.4e-3 .. 1.14e-2 over
# 1,000 probes through a real worker (benchmarks/probe_cost.py, RESULTS.md section 9); 2.5e-2 is 2.2x the worst,
# for rows wider than the tiny model's 128-256 (int8's row-wise absmax grows with the row). Under int8 a block
# whose MLP output projection is 10 % off reads 2.3e-2 .. 3.6e-2 (fails 97 % of probes), 20 % off 4.4e-2 .. 6.9e-2;
# 2 % off hides inside int8's own error (docs/trust.md).
# Half precision + int8 add the two; NF4 (~5e-2 per block) is derived, not measured: it needs CUDA.
TOLERANCE = {
    ("float32", "none"): 1e-3,
    ("float16", "none"): 2e-2,
    ("bfloat16", "none"): 4e-2,
    ("float16", "int8"): 4.5e-2,
    ("bfloat16", "int8"): 6.5e-2,
    ("float32", "int8"): 2.5e-2,
    ("float16", "nf4"): 2.5e-1,
    ("bfloat16", "nf4"): 2.5e-1,
    ("float32", "nf4"): 2.5e-1,
}


def tolerance_for(torch_dtype: str, quant_type: str) -> float:
    """The loosest tolerance among what the registration allows ('auto' quantization: NF4 on CUDA)."""
    quant = quant_type if quant_type in ("none", "int8", "nf4") else "nf4"
    return TOLERANCE.get((torch_dtype, quant), max(TOLERANCE.values()))


def span_tolerance(torch_dtype: str, quant_type: str, blocks: int) -> float:
    """The per-block tolerance grown by sqrt(blocks) for a span's update: each block adds its own independent
    rounding and quantization error. Measured on the tiny Llama's 4-block span, int8: honest 1.12e-2 .. 2.09e-2
    over 100 routed checks, 1.8x the one-block worst (1.14e-2); sqrt(4) = 2."""
    return tolerance_for(torch_dtype, quant_type) * max(1, blocks) ** 0.5


@dataclass(frozen=True)
class ProbeResult:
    block: int
    tokens: int
    error: float | None  # relative L2 error; None when the worker did not answer
    tolerance: float
    problem: str | None  # why the probe failed (None: passed)

    @property
    def passed(self) -> bool:
        return self.problem is None


class SpotChecker:
    """Probes a worker's span through the coordinator's mesh client (its DHT and petals' client code)."""

    def __init__(self, mesh, seed: int | None = None):
        self.mesh = mesh
        self._rng = random.Random(seed)
        self._reference: tuple[int, object] | None = None  # (block index, module): one block at a time
        self._reference_lock = threading.Lock()  # the probe loop and the routed checks share the loaded block

    def probe(self, peer_id: str, span: tuple[int, int], torch_dtype: str, quant_type: str) -> ProbeResult:
        import torch

        block = self._rng.randrange(span[0], span[1])
        tolerance = tolerance_for(torch_dtype, quant_type)
        config = self.mesh.model_config()
        generator = torch.Generator().manual_seed(self._rng.randrange(2**31))
        hidden = torch.randn(1, PROBE_TOKENS, config.hidden_size, generator=generator)
        expected = self.reference_output((block, block + 1), hidden)
        try:
            answered = self.mesh.forward_through(peer_id, block, hidden)
        except Exception as err:  # unreachable, refused, timed out: not a wrong answer, and not a pass
            return ProbeResult(block, 0, None, tolerance, f"no answer from the worker for block {block}: {err}")
        return compare(f"block {block}", block, PROBE_TOKENS, hidden, expected, answered, tolerance)

    def verify_routed(self, capture: FirstStep, torch_dtype: str, quant_type: str) -> ProbeResult:
        """Recompute a routed request's first step through the worker's span, block after block, from the hidden
        states the coordinator's client sent, and compare with what the worker returned. Its tokens are 0: the
        route of the request already attests that work."""
        start, end = capture.span
        tolerance = span_tolerance(torch_dtype, quant_type, end - start)
        sent = capture.sent.float()
        expected = self.reference_output(capture.span, sent)
        what = f"routed request {capture.session_id}: blocks {start}:{end}"
        return compare(what, start, 0, sent, expected, capture.returned, tolerance)

    def reference_output(self, span: tuple[int, int], hidden):
        """``hidden`` through the coordinator's own float32 blocks ``span[0]`` .. ``span[1] - 1``, loaded one at a
        time (a span of several blocks never holds more than one block's weights)."""
        import torch

        with self._reference_lock, torch.inference_mode():
            for block in range(*span):
                hidden = self._reference_block(block)(hidden)[0]
        return hidden

    def _reference_block(self, block: int):
        if self._reference is None or self._reference[0] != block:
            self._reference = None  # free the previous block's weights first
            self._reference = (block, self.mesh.load_block(block))
        return self._reference[1]


def compare(what: str, block: int, tokens: int, sent, expected, answered, tolerance: float) -> ProbeResult:
    """The worker's answer against the reference, as the relative L2 error of the span's update."""
    import torch

    if answered.shape != expected.shape or not torch.isfinite(answered).all():
        return ProbeResult(block, tokens, None, tolerance,
                           f"{what} returned shape {tuple(answered.shape)} or non-finite values")
    # Relative to the span's own update (output - input), not to its output: the residual stream passes
    # the input through unchanged and would hide a wrong update under its own size.
    error = float((answered.float() - expected).norm() / (expected - sent).norm().clamp_min(1e-12))
    problem = None
    if error > tolerance:
        problem = f"{what} activations differ from the reference: relative error {error:.3g} > {tolerance:g}"
    return ProbeResult(block, tokens, error, tolerance, problem)


def record_verdict(store, mesh, worker_id: str, result: ProbeResult, wrong: bool) -> set[str] | None:
    """Record a check's outcome; a wrong answer quarantines the worker (paid nothing from now, told why in its
    heartbeat answers) and the mesh client routes nothing more to it, now, not a probe period later. Returns the
    quarantined peers it read for that (None after a right answer)."""
    store.record_probe(worker_id, time.time(), result.block, result.tokens, result.error, result.tolerance,
                       result.problem, quarantine=wrong)
    if not wrong:
        return None
    log.warning("worker %s quarantined: %s", worker_id, result.problem)
    quarantined = store.quarantined_peers()
    mesh.exclude_peers(quarantined)
    return quarantined


class SpotCheckLoop:
    """Every ``period`` seconds, one probe per online, unquarantined worker with a known span that is due, in the
    order of services/probe_order.py (``workers_to_probe`` gives it). A wrong answer quarantines the worker (store)
    and the mesh client routes nothing more to it; no answer is recorded (the worker's view says the coordinator
    cannot reach it) but is not a wrong answer: several in a row only make the worker probed rarely."""

    def __init__(self, checker: SpotChecker, store, period: float, workers_to_probe):
        self.checker, self.store, self.period = checker, store, period
        self._workers_to_probe = workers_to_probe  # () -> rows of online workers with known spans
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spot-checks", daemon=True)
        self._dialled: dict[str, tuple[float, str]] = {}  # worker id -> (monotonic time, addresses dialled)

    def start(self) -> SpotCheckLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        round_at = time.monotonic() + self.period
        while not self._stop.wait(max(0.0, round_at - time.monotonic())):
            # A round starts every period and, past the serving workers and one more, has one period to run: what it
            # does not reach waits for the next round, at the front of its tier (services/probe_order.py), so workers
            # that do not answer cannot push a serving worker's probe further than the next round.
            round_at = time.monotonic() + self.period
            beyond_serving = 0  # probes of workers not (yet) proven serving in this round
            try:
                quarantined = self.store.quarantined_peers()
                # a coordinator restarted with quarantined workers on its ledger, or another replica's verdicts
                self.checker.mesh.exclude_peers(quarantined)
                for row in self._workers_to_probe():
                    if self._stop.is_set() or not probe_order.round_goes_on(row, beyond_serving,
                                                                            round_at - time.monotonic()):
                        break
                    if row["peer_id"] in quarantined:
                        continue
                    beyond_serving += row["probe_tier"] > 0
                    result = self.checker.probe(row["peer_id"], (row["block_start"], row["block_end"]),
                                                row["torch_dtype"], row["quant_type"])
                    wrong = not result.passed and result.tokens > 0  # it answered, and wrongly
                    now_quarantined = record_verdict(self.store, self.checker.mesh, row["worker_id"], result, wrong)
                    if now_quarantined is not None:
                        quarantined = now_quarantined
                    elif result.problem:
                        log.info("probe of worker %s: %s", row["worker_id"], result.problem)
                    self._check_reachability(row)  # after the verdict: a dial takes ~0.5 s per address
            except StoreFull:  # the disk is full: write_refusals said so once; the next round tries again
                continue
            except Exception:  # a probe round must never end the loop (mesh not loaded yet, DHT hiccup)
                log.exception("spot-check round failed")

    def _check_reachability(self, row) -> None:
        """Dial the worker's announced addresses directly; a worker only a relay reaches is told so."""
        last = self._dialled.get(row["worker_id"])
        if last and last[1] == row["announce_maddrs"] and time.monotonic() - last[0] < REDIAL_AFTER_S:
            return  # dialled these addresses recently (a short test period); new addresses are dialled at once
        self._dialled[row["worker_id"]] = (time.monotonic(), row["announce_maddrs"])
        try:
            result = reachability.check(row["peer_id"], json.loads(row["announce_maddrs"] or "[]"), time.time())
        except Exception:  # the dialler itself failed (no p2p daemon): say nothing about the worker
            log.exception("could not dial worker %s", row["worker_id"])
            return
        self.store.record_reachability(row["worker_id"], result.to_json())
        if result.problem:
            log.info("worker %s is %s", row["worker_id"], result.problem)


class RoutedChecks(CheckQueue):
    """Verifies a share of the completions the coordinator routes, with the client's own inputs: for a sampled
    request, one server session's first step is recomputed (SpotChecker.verify_routed) and a wrong answer
    quarantines the worker like a failed probe.

    The mesh client asks ``sample()`` as a request starts and hands its capture to ``submit()`` once the
    completion is done; ``submit`` never waits. One verification runs at a time, in this object's thread; at
    most ``max_queued`` wait, and captures beyond are dropped (and counted): a burst of traffic never makes the
    coordinator hold more than a few prompts' hidden states or fall behind."""

    OUTCOMES = ("sampled", "verified", "failed", "dropped", "unverifiable")

    def __init__(self, checker: SpotChecker, store, share: float, max_queued: int = 4, registry=None,
                 seed: int | None = None):
        super().__init__(max_queued=max_queued, thread_name="routed-checks", registry=registry,
                         metric="farworker_coordinator_routed_checks",
                         description="Routed completions sampled for a spot check: sampled; verified (recomputed "
                         "and compared); failed (of those verified, differed: quarantined); dropped (queue full); "
                         "unverifiable (unknown or already quarantined worker, or the recomputation failed)")
        self.checker, self.store, self.share = checker, store, share
        self._rng = random.Random(seed)
        self._recent: dict[str, deque] = {}  # worker id -> its last RECENT_ROUTED_CHECKS outcomes

    def recent(self, worker_id: str) -> list[dict]:
        """This worker's last routed checks, newest first: when, span, positions, error against the tolerance."""
        with self._lock:
            return list(self._recent.get(worker_id, ()))[::-1]

    def _remember(self, worker_id: str, capture: FirstStep, result: ProbeResult) -> None:
        outcome = {"at": time.time(), "span": list(capture.span), "positions": int(capture.sent.shape[1]),
                   "error": result.error, "tolerance": result.tolerance, "problem": result.problem}
        with self._lock:
            self._recent.setdefault(worker_id, deque(maxlen=RECENT_ROUTED_CHECKS)).append(outcome)

    def sample(self) -> bool:
        return self.share > 0 and self._rng.random() < self.share

    def submit(self, capture: FirstStep) -> None:
        self._count("sampled")
        if not self._offer(capture):
            self._count("dropped")

    def view(self, worker_id: str) -> dict:
        """For GET /v1/workers: this worker's routed requests verified since the coordinator started."""
        counts = self.worker_counts(worker_id)
        return {"routed_checks": counts.get("verified", 0), "routed_checks_failed": counts.get("failed", 0)}

    def _check(self, capture: FirstStep) -> None:
        worker_id = self.store.worker_by_peer(capture.peer_id)
        row = self.store.worker_row(worker_id) if worker_id else None
        if row is None or self.store.quarantine_of(worker_id):
            self._count("unverifiable")  # not a registered worker, or already quarantined: nothing more to learn
            return
        result = self.checker.verify_routed(capture, row["torch_dtype"], row["quant_type"])
        self._remember(worker_id, capture, result)
        if result.passed:  # counted here only: the probes table (and its counts) holds what the coordinator sent
            log.debug("routed check of worker %s, blocks %d:%d, %d positions: relative error %.3g (tolerance %g)",
                      worker_id, *capture.span, capture.sent.shape[1], result.error, result.tolerance)
            self._count("verified", worker_id=worker_id)
            return
        # It answered (the request got these activations back): any failure is a wrong answer. The failure is
        # recorded as a probe row (tokens 0: the route already attests the work), which is what quarantines.
        record_verdict(self.store, self.checker.mesh, worker_id, result, wrong=True)
        self._count("verified", "failed", worker_id=worker_id)
