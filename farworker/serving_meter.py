"""Counts the work the Petals server really does, on its serving path.

Petals' connection handlers run in forked processes. Before the server starts, we wrap the handler's
inference-step iterator and forward calls in the parent; the forked handlers inherit the wrappers and
report each finished session or forward pass through a multiprocessing queue. The parent turns the
events into counters (heartbeats, status, metrics) and usage records (the durable outbox).

A step counts once its output was produced and sent: the wrapper is resumed only after the handler
has yielded the step's response, so a step that failed mid-way is not billed.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from farworker.petals_compat import import_petals


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
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="serving-meter", daemon=True)
        self._install()
        self._thread.start()

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
            started, tokens, steps, failed = time.time(), 0, 0, False
            sink.put(("open", None))
            try:
                async for request, metadata in original_steps(
                    handler, first_request, requests, session_id, requested_uids, context
                ):
                    pending = _tokens_of(request)
                    yield request, metadata
                    tokens, steps = tokens + pending, steps + 1  # resumed: the step's output went out
            except GeneratorExit:
                raise
            except BaseException:
                failed = True
                raise
            finally:
                sink.put(("session", {
                    "id": str(uuid.uuid4()),
                    "session_id": session_id or "",
                    "blocks": _block_span(requested_uids),
                    "tokens": tokens,
                    "steps": steps,
                    "started_at": started,
                    "ended_at": time.time(),
                    "failed": failed,
                }))

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
            uids = request.uid.split(" ")
            sink.put(("forward", {
                "id": str(uuid.uuid4()),
                "session_id": "",
                "blocks": _block_span(uids),
                "tokens": _tokens_of(request),
                "steps": 1,
                "started_at": started,
                "ended_at": time.time(),
                "failed": False,
            }))
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

    def _account(self, kind: str, payload: dict | None) -> None:
        with self._lock:
            c = self.counters
            if kind == "open":
                c.open_sessions += 1
                return
            if kind == "error":
                c.requests += 1
                c.errors += 1
                return
            if kind == "session":
                c.open_sessions = max(0, c.open_sessions - 1)
            c.requests += 1
            c.inference_steps += payload["steps"]
            c.tokens_processed += payload["tokens"]
            c.errors += int(payload.pop("failed"))
        if payload["tokens"] > 0:
            self._on_record(payload)
