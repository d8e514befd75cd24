"""Counts the work the Petals server really does, on its serving path.

Petals' connection handlers run in forked processes. Before the server starts, we wrap the handler's
inference-step iterator and forward calls in the parent; the forked handlers inherit the wrappers.
Billing does not depend on any other process staying alive: the handler that served a step writes it
to the durable outbox itself (its own SQLite connection), then tells the parent through a
multiprocessing queue, which keeps the counters (heartbeats, status, metrics) and wakes the reporter.

A step counts once its output was produced and sent: the wrapper is resumed only after the handler
has yielded the step's response, so a step that failed mid-way is not billed. An open session's
running segment is held on disk at every step (``Outbox.hold_open``) and becomes a usage record when
the session closes or every SEGMENT_SECONDS; after a ``kill -9`` the next start recovers the held
segments, so no served step is lost and none is doubled.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from farworker.outbox import Outbox, make_record
from farworker.petals.compat import import_petals

log = logging.getLogger(__name__)

# A long session reports its usage at least this often (the variable exists for tests).
SEGMENT_SECONDS = float(os.environ.get("FARWORKER_USAGE_SEGMENT_SECONDS", "10"))


@dataclass
class ServingCounters:
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


_handler_outboxes: dict[int, Outbox] = {}  # pid -> this process's connection to the outbox file


def _outbox_here(path: str) -> Outbox:
    """The calling process's own Outbox (a connection or lock must not cross the handlers' fork)."""
    outbox = _handler_outboxes.get(os.getpid())
    if outbox is None:
        outbox = _handler_outboxes[os.getpid()] = Outbox(path)
    return outbox


def _store(sink, path: str, kind: str, record: dict) -> None:
    """Add a finished record to the outbox from this (handler) process, then tell the parent. Should the
    write fail (disk full), the parent gets the record to store instead; serving goes on either way.
    A record of no tokens is only counted (a step or pass that carried no hidden states is not billed)."""
    if record["tokens"] <= 0:
        sink.put((kind, record, True))
        return
    try:
        _outbox_here(path).add(record)
        stored = True
    except Exception as err:  # noqa: BLE001 - billing trouble must not break the client's request
        log.error("usage record %s not stored by the handler (%s); the worker process will store it",
                  record["id"], err)
        stored = False
    sink.put((kind, record, stored))


_hold_failing: dict[int, bool] = {}  # pid -> its last hold_open failed (said once, not at every step)


def _hold(path: str, record: dict) -> None:
    if record["tokens"] <= 0:
        return
    try:
        _outbox_here(path).hold_open(record)
    except Exception as err:  # noqa: BLE001 - as above; the segment is still added when it closes
        if not _hold_failing.get(os.getpid()):
            log.warning("open segments not held on disk (%s), until a write succeeds: a SIGKILL mid-session "
                        "would lose their steps", err)
        _hold_failing[os.getpid()] = True
    else:
        _hold_failing[os.getpid()] = False


def _tokens_of(request) -> int:
    # The first tensor is the hidden states [batch, new tokens, hidden]; its shape is in the header,
    # so counting costs no deserialization.
    if not request.tensors or len(request.tensors[0].size) < 2:
        return 0
    size = request.tensors[0].size
    return int(size[0]) * int(size[1])


def _metered_unary(original):
    """An RPC answered in one message: on success, one record of the tokens its request carried."""

    # hivemind registers rpc_* methods by their annotations, so the wrapper carries the original's.
    @functools.wraps(original)
    async def metered(handler, request, context):
        sink = type(handler)._farworker_events
        started = time.time()
        try:
            response = await original(handler, request, context)
        except BaseException:
            sink.put(("error", None))
            raise
        record = make_record("", _block_span(request.uid.split(" ")), _tokens_of(request), 1, started)
        _store(sink, type(handler)._farworker_outbox_path, "forward", record)
        return response

    return metered


def _metered_stream(original):
    """An RPC whose request comes in parts (a large tensor split for streaming): the first part carries the
    uids and the first tensor's shape; one record once the answer has gone out."""

    @functools.wraps(original)
    async def metered(handler, requests, context):
        sink = type(handler)._farworker_events
        started = time.time()
        first = []

        async def watched():
            async for request in requests:
                if not first:
                    first.append(request)
                yield request

        try:
            async for response in original(handler, watched(), context):
                yield response
        except BaseException:
            sink.put(("error", None))
            raise
        if first:
            record = make_record("", _block_span(first[0].uid.split(" ")), _tokens_of(first[0]), 1, started)
            _store(sink, type(handler)._farworker_outbox_path, "forward", record)

    return metered


class ServingMeter:
    """Install once per process, before the Petals server forks its handlers."""

    def __init__(self, outbox: Outbox):
        """``outbox``: the worker's outbox; handlers open their own connection to its file, and this process
        stores a record a handler could not."""
        self._events: mp.Queue = mp.Queue()
        self._outbox = outbox
        self.counters = ServingCounters()
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

    def snapshot(self) -> ServingCounters:
        with self._lock:
            return ServingCounters(**vars(self.counters))

    def _install(self) -> None:
        import_petals()
        from petals.server.handler import TransformerConnectionHandler

        TransformerConnectionHandler._farworker_events = self._events
        TransformerConnectionHandler._farworker_outbox_path = str(self._outbox.path)
        if getattr(TransformerConnectionHandler, "_farworker_metered", False):
            return
        original_steps = TransformerConnectionHandler._iterate_inference_steps

        async def metered_steps(handler, first_request, requests, session_id, requested_uids, context):
            sink, path = type(handler)._farworker_events, type(handler)._farworker_outbox_path
            blocks = _block_span(requested_uids)
            segment = {"id": str(uuid.uuid4()), "started": time.time(), "tokens": 0, "steps": 0}

            def current() -> dict:
                return make_record(session_id or "", blocks, segment["tokens"], segment["steps"],
                                   segment["started"], record_id=segment["id"])

            def report_segment():
                # A long chat session is billed in segments: its records reach the coordinator while it lasts.
                if segment["steps"]:
                    _store(sink, path, "usage", current())
                segment.update(id=str(uuid.uuid4()), started=time.time(), tokens=0, steps=0)

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
                    else:
                        _hold(path, current())  # on disk before the handler reads the next step
            except GeneratorExit:
                raise
            except BaseException:
                failed = True
                raise
            finally:
                report_segment()
                sink.put(("close", failed))

        TransformerConnectionHandler._iterate_inference_steps = metered_steps
        # Every other RPC that computes is billed by the tokens it processes, like a forward pass: rpc_forward,
        # rpc_forward_stream (a forward over petals' unary size), and backward passes (fine-tuning traffic).
        for name in ("rpc_forward", "rpc_backward"):
            setattr(TransformerConnectionHandler, name, _metered_unary(getattr(TransformerConnectionHandler, name)))
        for name in ("rpc_forward_stream", "rpc_backward_stream"):
            setattr(TransformerConnectionHandler, name, _metered_stream(getattr(TransformerConnectionHandler, name)))
        TransformerConnectionHandler._farworker_metered = True

    def _drain(self) -> None:
        while True:
            try:
                kind, payload, *stored = self._events.get(timeout=1.0)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            self._account(kind, payload, stored == [True])

    def _account(self, kind: str, payload, stored: bool = False) -> None:
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
        if payload["tokens"] <= 0:
            return
        if stored:
            self._outbox.notify_listeners()  # the reporter sends it soon
        else:
            self._outbox.add_or_hold(payload)  # a full state dir: held in memory, serving goes on
