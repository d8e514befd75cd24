"""Completions through the mesh: admission (how many generations at once), API keys, generation with its route
recorded, and server-sent-event streams of completions and chat completions.

Every generation runs in its own thread and petals inference session (`CompletionsMesh.generate`); at most
``max_active`` at once, ``max_queued`` more wait, and beyond that a request gets 429 with Retry-After. A
streamed request whose client goes away is cancelled at the next token; what the mesh served until then is
still recorded as the request's route (attested, so the workers are paid for it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from farworker.coordinator.errors import ApiError
from farworker.coordinator.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    openai_error,
)
from farworker.mesh_client import MeshError


class Busy(Exception):
    """No room for another generation now (429)."""


class Admission:
    """At most ``max_active`` generations at once and ``max_queued`` waiting; the rest are refused at once."""

    def __init__(self, max_active: int, max_queued: int, wait_timeout: float = 60.0):
        self.max_active, self.max_queued, self.wait_timeout = max_active, max_queued, wait_timeout
        self._cond = threading.Condition()
        self.active = self.waiting = 0

    def enter(self) -> None:
        with self._cond:
            if self.active >= self.max_active:
                if self.waiting >= self.max_queued:
                    raise Busy(f"{self.active} generations running and {self.waiting} waiting")
                self.waiting += 1
                try:
                    if not self._cond.wait_for(lambda: self.active < self.max_active, self.wait_timeout):
                        raise Busy(f"no generation slot freed within {self.wait_timeout:.0f} s")
                finally:
                    self.waiting -= 1
            self.active += 1

    def leave(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()


class TextDeltas:
    """Text of a growing token list, handed out in pieces: a piece is held back while it ends inside a UTF-8
    character (byte-level tokens) or could still become a stop string."""

    def __init__(self, decode: Callable[[list[int]], str | None], stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.tokens: list[int] = []
        self.sent = 0  # characters already handed out

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens) or ""
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text) - 1
        for s in self.stop:  # never past a stop string (the generation ends at it)
            if s in text:
                safe = min(safe, text.find(s))
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):  # the longest tail that begins a stop string
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        piece, self.sent = text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return piece

    def rest(self, final_text: str | None) -> str:
        """What the final (stop-cut) text has beyond what was handed out."""
        return (final_text or "")[self.sent:]


@dataclass
class StreamSpec:
    """How one streamed request turns tokens into chunks (completions and chat differ only here)."""

    first: Callable[[], dict | None]  # a chunk before any token (chat: the assistant role), or None
    piece: Callable[[str, int], dict]  # (text piece, token id) -> chunk
    last: Callable[[object], dict]  # (the Generation) -> final chunk with finish_reason


async def sse_stream(run: Callable[..., object], spec: StreamSpec, on_error: Callable[[Exception], dict],
                     decode, stop: tuple[str, ...]) -> AsyncIterator[str]:
    """Runs ``run(on_token=..., cancelled=...)`` in a thread and yields its tokens as server-sent events, then
    ``data: [DONE]``. A client that disconnects cancels the generation at its next token."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # filled from the generation thread; awaiting it holds no thread
    cancelled = threading.Event()
    deltas = TextDeltas(decode, stop)

    def put(item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    def generate():
        try:
            put(("done", run(on_token=lambda t: put(("token", t)), cancelled=cancelled)))
        except Exception as err:  # MeshError, Busy: one error event, then the end of the stream
            put(("error", err))

    threading.Thread(target=generate, name="stream-generation", daemon=True).start()
    try:
        first = spec.first()
        if first is not None:
            yield _event(first)
        while True:
            kind, value = await events.get()
            if kind == "token":
                piece = deltas.push(value)
                yield _event(spec.piece(piece, value))
            elif kind == "error":
                yield _event(on_error(value))
                break
            else:
                rest = deltas.rest(value.text)
                if rest:
                    yield _event(spec.piece(rest, -1))
                yield _event(spec.last(value))
                break
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()  # the client went away (or we are done): stop generating at the next token


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def now_s() -> int:
    return int(time.time())


def usage_of(result) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.completion_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_error(err: Exception) -> dict:
    """The error event that ends a stream: the refusal's own, or the mesh's failure."""
    if isinstance(err, ApiError):
        return openai_error(err.status, err.message, err.code, err.field)
    return openai_error(503, f"the mesh could not serve the request: {err}", "mesh_unavailable", None)


@dataclass
class Stream:
    """A streamed answer: its server-sent events, for the router to send as text/event-stream."""

    events: AsyncIterator[str]


class Completions:
    """Completions and chat completions through the coordinator's mesh client (None: no model configured). Each
    generation takes an admission slot and records its route (attested work) under the request's id."""

    def __init__(self, settings, store, runtime):
        self.settings, self.store, self.runtime = settings, store, runtime
        self.mesh = runtime.mesh
        self.admission = Admission(settings.max_active_generations, settings.max_queued_generations)
        self.started = int(time.time())

    def served_model(self, requested: str | None) -> str:
        if self.mesh is None:
            raise ApiError(503, "this coordinator has no model configured for completions (--model-path)", "no_model")
        if requested and requested != self.settings.model_name:
            raise ApiError(400, f"model {requested!r} is not served here; this mesh serves "
                           f"{self.settings.model_name!r}", "unknown_model", "model")
        return self.settings.model_name

    def model_names(self) -> list[str]:
        return [self.settings.model_name] if self.mesh is not None else []

    def caller(self, authorization: str) -> str | None:
        """The name of the API key an ``Authorization: Bearer KEY`` header carries; None when no keys are set."""
        if not self.settings.api_keys:
            return None
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        for key, name in self.settings.api_keys.items():
            if token and hmac.compare_digest(token.encode(), key.encode()):
                return name
        raise ApiError(401, "this mesh needs an API key: send Authorization: Bearer <key>", "invalid_api_key")

    def _admit(self) -> None:
        try:
            self.admission.enter()
        except Busy as busy:
            raise ApiError(429, f"the mesh is at its limit of concurrent generations ({busy}); retry shortly",
                           "rate_limited") from None

    def _generation(self, body, prompt_ids_of, completion_id: str, key_name: str | None):
        """A run(on_token, cancelled) -> Generation for the request, which records the route (attested) and
        frees its admission slot however it ends."""

        def run(on_token=None, cancelled=None):
            try:
                result = self.mesh.generate(prompt_ids_of(), body.max_tokens, body.temperature, top_p=body.top_p,
                                            seed=body.seed, stop=body.stop_strings(), on_token=on_token,
                                            cancelled=cancelled, first_steps=self.runtime.routed_checks,
                                            audits=self.runtime.session_audits)
            except MeshError as err:
                raise ApiError(err.status, str(err), err.code, err.field) from None
            finally:
                self.admission.leave()
            route = [dict(span, worker_id=self.store.worker_by_peer(span["peer_id"])) for span in result.route]
            self.store.record_completion(completion_id, time.time(), self.settings.model_name,
                                         len(result.prompt_ids), len(result.completion_ids), route, key_name)
            result.route, result.id = route, completion_id
            return result

        return run

    def _stream(self, run, spec: StreamSpec, stop: tuple[str, ...]) -> Stream:
        return Stream(sse_stream(run, spec, stream_error, self.mesh.decode, stop))

    def complete(self, body: CompletionRequest, key_name: str | None) -> CompletionResponse | Stream:
        model = self.served_model(body.model)
        run_id = f"cmpl-{uuid.uuid4().hex}"
        run = self._generation(body, lambda: body.prompt, run_id, key_name)
        self._admit()
        if body.stream:
            def chunk(text: str, token_ids: list[int], finish: str | None) -> dict:
                return {"id": run_id, "object": "text_completion", "created": now_s(), "model": model,
                        "choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish}]}

            def last(result) -> dict:
                return {**chunk("", [], result.finish_reason), "usage": usage_of(result), "route": result.route}

            spec = StreamSpec(lambda: None, lambda text, token: chunk(text, [token] if token >= 0 else [], None), last)
            return self._stream(run, spec, body.stop_strings())
        result = run()
        return CompletionResponse(
            id=result.id,
            created=now_s(),
            model=model,
            choices=[{"index": 0, "text": result.text, "token_ids": result.completion_ids,
                      "finish_reason": result.finish_reason}],
            usage=usage_of(result),
            route=result.route,
        )

    def chat(self, body: ChatCompletionRequest, key_name: str | None) -> ChatCompletionResponse | Stream:
        model = self.served_model(body.model)
        try:  # the template's refusals (roles out of order, no tokenizer) before any slot is taken
            prompt_ids = self.mesh.chat_prompt_ids([m.model_dump() for m in body.messages])
        except MeshError as err:
            raise ApiError(err.status, str(err), err.code, err.field) from None
        run_id = f"chatcmpl-{uuid.uuid4().hex}"
        run = self._generation(body, lambda: prompt_ids, run_id, key_name)
        self._admit()

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": run_id, "object": "chat.completion.chunk", "created": now_s(), "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            def last(result) -> dict:
                return {**chunk({}, result.finish_reason), "usage": usage_of(result), "route": result.route}

            spec = StreamSpec(lambda: chunk({"role": "assistant", "content": ""}, None),
                              lambda text, _token: chunk({"content": text}, None), last)
            return self._stream(run, spec, body.stop_strings())
        result = run()
        return ChatCompletionResponse(
            id=result.id,
            created=now_s(),
            model=model,
            choices=[{"index": 0, "message": {"role": "assistant", "content": result.text or ""},
                      "finish_reason": result.finish_reason}],
            usage=usage_of(result),
            route=result.route,
        )
