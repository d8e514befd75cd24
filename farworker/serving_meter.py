"""Counts the work the Petals server really does, on its serving path.

Petals' connection handlers run in forked processes. Before the server starts, we wrap the handler's
inference-step iterator and forward calls in the parent; the forked handlers inherit the wrappers and
report each finished session or forward pass through a multiprocessing queue. The parent turns the
events into counters (heartbeats, status, metrics) and usage records (the durable outbox).

A step counts once its output was produced and sent: the wrapper is resumed only after the handler
has yielded the step's response, so a step that failed mid-way is not billed. A session reports its
usage when it closes and every SEGMENT_SECONDS while it lasts, so a crash loses at most one segment.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from farworker.petals_compat import import_petals

# A long session reports its usage at least this often (the variable exists for tests).
SEGMENT_SECONDS = float(os.environ.get("FARWORKER_USAGE_SEGMENT_SECONDS", "10"))


@dataclass
class Counters:
    requests: int = 0
    inference_steps: int = 0
    tokens_processed: int = 0
    errors: int = 0
    open_sessions: int = 0
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "inference_steps": self.inference_steps,
            "tokens_processed": self.tokens_processed,
            "errors": self.errors,
        }


def _block_span(uids) -> list[int]:
    indices = [int(uid.rsplit(".", 1)[1]) for uid in uids]
    return [min(indices), max(indices) + 1]


def _record(session_id: str | None, blocks: list[int], tokens: int, steps: int, started: float) -> dict:
    return {"id": str(uuid.uuid4()), "session_id": session_id or "", "blocks": blocks, "tokens": tokens,
            "steps": steps, "started_at": started, "ended_at": time.time()}


def _tokens_of(request) -> int:
    # The first tensor is the hidden states [batch, new tokens, hidden]; its shape is in the header,
    # so counting costs no deserialization.
    if not request.tensors or len(request.tensors[0].size) < 2:
        return 0
    size = request.tensors[0].size
    return int(size[0]) * int(size[1])


class ServingMeter:
    """Install once per process, before the Petals server forks its handlers."""

    def __init__(self, on_record: Callable[[dict], None]):
        self._events: mp.Queue = mp.Queue()
        self._on_record = on_record
        self.counters = Counters()
        self._last_event = time.monotonic()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="serving-meter", daemon=True)
        self._install()
        self._thread.start()

    def wait_settled(self, quiet: float = 0.3, timeout: float = 3.0) -> None:
        """Return once the events the handlers sent have been accounted (nothing new for ``quiet`` seconds),
        so a stopping worker writes every closed session's usage to the outbox before it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._events.empty() and time.monotonic() - self._last_event >= quiet:
                return
            time.sleep(0.05)

    def seconds_since_event(self) -> float:
        return time.monotonic() - self._last_event

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(**vars(self.counters))

    def _install(self) -> None:
        import_petals()
        from petals.server.handler import TransformerConnectionHandler

        if getattr(TransformerConnectionHandler, "_farworker_metered", False):
            TransformerConnectionHandler._farworker_events = self._events
            return
        events = self._events
        TransformerConnectionHandler._farworker_events = events
        original_steps = TransformerConnectionHandler._iterate_inference_steps
        original_forward = TransformerConnectionHandler.rpc_forward

        async def metered_steps(handler, first_request, requests, session_id, requested_uids, context):
            sink = type(handler)._farworker_events
            blocks = _block_span(requested_uids)
            segment = {"started": time.time(), "tokens": 0, "steps": 0}

            def report_segment():
                # A long chat session is billed in segments, so a crash loses at most one segment.
                if segment["steps"]:
                    sink.put(("usage", _record(session_id, blocks, segment["tokens"], segment["steps"],
                                               segment["started"])))
                segment.update(started=time.time(), tokens=0, steps=0)

            failed = False
            sink.put(("open", None))
            try:
                async for request, metadata in original_steps(
                    handler, first_request, requests, session_id, requested_uids, context
                ):
                    pending = _tokens_of(request)
                    yield request, metadata
                    segment["tokens"] += pending  # resumed: the step's output went out
                    segment["steps"] += 1
                    if time.time() - segment["started"] >= SEGMENT_SECONDS:
                        report_segment()
            except GeneratorExit:
                raise
            except BaseException:
                failed = True
                raise
            finally:
                report_segment()
                sink.put(("close", failed))

        # hivemind registers rpc_* methods by their annotations, so the wrapper carries the original's.
        @functools.wraps(original_forward)
        async def metered_forward(handler, request, context):
            sink = type(handler)._farworker_events
            started = time.time()
            try:
                response = await original_forward(handler, request, context)
            except BaseException:
                sink.put(("error", None))
                raise
            sink.put(("forward", _record(None, _block_span(request.uid.split(" ")), _tokens_of(request), 1, started)))
            return response

        TransformerConnectionHandler._iterate_inference_steps = metered_steps
        TransformerConnectionHandler.rpc_forward = metered_forward
        TransformerConnectionHandler._farworker_metered = True

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self._events.get(timeout=1.0)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            self._account(kind, payload)

    def _account(self, kind: str, payload) -> None:
        self._last_event = time.monotonic()
        with self._lock:
            c = self.counters
            if kind == "open":
                c.open_sessions += 1
                return
            if kind == "close":
                c.open_sessions = max(0, c.open_sessions - 1)
                c.requests += 1
                c.errors += int(payload)
                return
            if kind == "error":
                c.requests += 1
                c.errors += 1
                return
            c.requests += kind == "forward"  # a session counts once, at close
            c.inference_steps += payload["steps"] if kind == "usage" else 0
            c.tokens_processed += payload["tokens"]
        if payload["tokens"] > 0:
            self._on_record(payload)
