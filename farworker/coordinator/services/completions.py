"""Completions through the mesh: admission (how many generations at once), API keys, generation with its route
recorded, and server-sent-event streams of completions and chat completions.

Every generation runs in its own thread and petals inference session (`CompletionsMesh.generate`); at most
``max_active`` at once, ``max_queued`` more wait, and beyond that a request gets 429 with Retry-After. A
streamed request whose client goes away is cancelled at the next token; what the mesh served until then is
still recorded as the request's route (attested, so the workers are paid for it).
"""

from __future__ import annotations

import asyncio
import functools
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

    first: Callable[[int], dict | None]  # (choice index) -> a chunk before any token (chat: the role), or None
    piece: Callable[[int, str, int, object], dict]  # (choice index, text piece, token id or -1, TokenLogprob) -> chunk
    last: Callable[[object], list[dict]]  # (the Answer) -> final chunks: each choice's finish_reason, then usage


async def sse_stream(run: Callable[..., object], spec: StreamSpec, choices: int,
                     on_error: Callable[[Exception], dict], decode, stop: tuple[str, ...]) -> AsyncIterator[str]:
    """Runs ``run(on_token=..., cancelled=...)`` in a thread and yields its tokens as server-sent events (each
    choice's in turn: ``on_token(index, token, logprob entry)``), then ``data: [DONE]``. A client that disconnects
    cancels the generation at its next token."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # filled from the generation thread; awaiting it holds no thread
    cancelled = threading.Event()
    deltas = [TextDeltas(decode, stop) for _ in range(choices)]

    def put(item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    def generate():
        try:
            put(("done", run(on_token=lambda index, token, entry: put(("token", (index, token, entry))),
                             cancelled=cancelled)))
        except Exception as err:  # MeshError, Busy: one error event, then the end of the stream
            put(("error", err))

    threading.Thread(target=generate, name="stream-generation", daemon=True).start()
    try:
        for index in range(choices):
            first = spec.first(index)
            if first is not None:
                yield _event(first)
        while True:
            kind, value = await events.get()
            if kind == "token":
                index, token, entry = value
                yield _event(spec.piece(index, deltas[index].push(token), token, entry))
            elif kind == "error":
                yield _event(on_error(value))
                break
            else:
                for index, generation in enumerate(value.generations):
                    rest = deltas[index].rest(generation.text)
                    if rest:
                        yield _event(spec.piece(index, rest, -1, None))
                for chunk in spec.last(value):
                    yield _event(chunk)
                break
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()  # the client went away (or we are done): stop generating at the next token


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def now_s() -> int:
    return int(time.time())


@dataclass
class Answer:
    """What one request's generations came to: one Generation per choice (prompt-major, then n), its id and its
    route (every server session of every choice, attested)."""

    id: str
    generations: list
    route: list[dict]
    n: int

    def usage(self) -> dict:
        """OpenAI's: each prompt counted once however many choices it has; completion tokens summed over choices
        (an echoed prompt is not a completion token)."""
        prompt = sum(len(g.prompt_ids) for g in self.generations[::self.n])
        completion = sum(len(g.completion_ids) for g in self.generations)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class TokenTexts:
    """One choice's tokens as text for its log-probabilities: each token's text in the context of those before it,
    and where it starts in the choice's text."""

    def __init__(self, mesh, context: list[int], offset: int = 0):
        self.mesh, self.context, self.offset = mesh, list(context), offset

    def _each(self, entries):
        for entry in entries:
            text, others = self.mesh.token_texts(self.context, entry.token, [t for t, _ in entry.top])
            yield entry, text, others, self.offset
            self.offset += len(text)
            self.context.append(entry.token)

    def completion(self, entries) -> dict:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        shape: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry, text, others, offset in self._each(entries):
            top = None
            if entry.logprob is not None:
                top = {}
                for other, (_, logprob) in zip(others, entry.top, strict=True):
                    top.setdefault(other, logprob)  # two tokens with one text: the likelier one's
                top.setdefault(text, entry.logprob)  # the chosen token always, as OpenAI and vLLM
            shape["tokens"].append(text)
            shape["token_logprobs"].append(entry.logprob)
            shape["top_logprobs"].append(top)
            shape["text_offset"].append(offset)
        return shape

    def chat(self, entries) -> dict:
        """The chat shape: content[] of {token, logprob, bytes, top_logprobs[]}."""
        content = []
        for entry, text, others, _offset in self._each(entries):
            content.append({"token": text, "logprob": entry.logprob, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": other, "logprob": logprob, "bytes": list(other.encode())}
                                             for other, (_, logprob) in zip(others, entry.top, strict=True)]})
        return {"content": content}


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

    def _generation(self, body, prompts: list, completion_id: str, key_name: str | None, *,
                    logprobs: int | None = None, echo: bool = False):
        """A run(on_token, cancelled) -> Answer for the request: each prompt's n choices, each in its own inference
        session (petals keeps a session's attention cache on its servers and cannot fork it, so choices cannot share
        a prefill; n rows of one batched session would each be prefilled too, and the client's route counts a
        session's positions where the worker meters rows x positions). Records the route of everything served
        (attested), even of a request that failed midway, and frees its admission slot however it ends."""

        def run(on_token=None, cancelled=None) -> Answer:
            generations, failure = [], None
            try:
                for p, prompt in enumerate(prompts):
                    for j in range(body.n):
                        if cancelled is not None and cancelled.is_set():
                            break
                        index = p * body.n + j
                        seed = None if body.seed is None else (body.seed + j) % 2**63  # distinct, reproducible
                        generations.append(self.mesh.generate(
                            prompt, body.max_tokens, body.temperature, top_p=body.top_p, seed=seed,
                            stop=body.stop_strings(), cancelled=cancelled,
                            on_token=None if on_token is None else functools.partial(on_token, index),
                            first_steps=self.runtime.routed_checks, audits=self.runtime.session_audits,
                            logprobs=logprobs, echo=echo))
            except MeshError as err:
                failure = ApiError(err.status, str(err), err.code, err.field)
            finally:
                self.admission.leave()
            spans = [span for g in generations for span in g.route]
            worker_of = {peer: self.store.worker_by_peer(peer) for peer in {span["peer_id"] for span in spans}}
            route = [dict(span, worker_id=worker_of[span["peer_id"]]) for span in spans]  # one lookup per peer
            answer = Answer(completion_id, generations, route, body.n)
            if generations:  # what the mesh served is owed to its workers, whatever became of the rest
                usage = answer.usage()
                self.store.record_completion(completion_id, time.time(), self.settings.model_name,
                                             usage["prompt_tokens"], usage["completion_tokens"], route, key_name)
            if failure is not None:
                raise failure from None
            for g in generations:
                g.route, g.id = route, completion_id
            return answer

        return run

    def _stream(self, run, spec: StreamSpec, choices: int, stop: tuple[str, ...]) -> Stream:
        return Stream(sse_stream(run, spec, choices, stream_error, self.mesh.decode, stop))

    def complete(self, body: CompletionRequest, key_name: str | None) -> CompletionResponse | Stream:
        model = self.served_model(body.model)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 needs echo (it scores the prompt and generates nothing); send "
                           "max_tokens >= 1 or echo true", "invalid_payload", "max_tokens")
        if body.echo and body.stream:
            raise ApiError(400, "echo is not streamed: send stream false with echo", "invalid_payload", "echo")
        prompts = body.prompts()
        run_id = f"cmpl-{uuid.uuid4().hex}"
        run = self._generation(body, prompts, run_id, key_name, logprobs=body.logprobs,
                              echo=body.echo and body.logprobs is not None)  # echo's text needs no forward
        self._admit()
        if body.stream:
            texts: dict[int, TokenTexts] = {}

            def chunk(index: int, text: str, token_ids: list[int], finish: str | None, logprobs=None) -> dict:
                return {"id": run_id, "object": "text_completion", "created": now_s(), "model": model,
                        "choices": [{"index": index, "text": text, "token_ids": token_ids, "logprobs": logprobs,
                                     "finish_reason": finish}]}

            def piece(index: int, text: str, token: int, entry) -> dict:
                logprobs = None
                if entry is not None:  # the text of a choice's tokens follows its prompt's
                    if index not in texts:
                        texts[index] = TokenTexts(self.mesh, self.mesh.prompt_ids(prompts[index // body.n]))
                    logprobs = texts[index].completion([entry])
                return chunk(index, text, [token] if token >= 0 else [], None, logprobs)

            def last(answer: Answer) -> list[dict]:
                chunks = [chunk(i, "", [], g.finish_reason) for i, g in enumerate(answer.generations)]
                chunks[-1].update(usage=answer.usage(), route=answer.route)
                return chunks

            return self._stream(run, StreamSpec(lambda _index: None, piece, last), len(prompts) * body.n,
                                body.stop_strings())
        answer = run()
        choices = []
        for index, g in enumerate(answer.generations):
            text, logprobs = g.text, None
            prompt = prompts[index // body.n]
            echoed = (prompt if isinstance(prompt, str) else self.mesh.decode(g.prompt_ids)) if body.echo else None
            if echoed is not None and text is not None:
                text = echoed + text
            if body.logprobs is not None:
                texts = TokenTexts(self.mesh, [])
                logprobs = texts.completion(g.prompt_logprobs) if body.echo else {
                    "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                texts.context = list(g.prompt_ids)
                texts.offset = len(echoed or "")
                rest = texts.completion(g.logprobs or [])
                for key in logprobs:
                    logprobs[key] += rest[key]
            choices.append({"index": index, "text": text, "token_ids": g.completion_ids, "logprobs": logprobs,
                            "finish_reason": g.finish_reason})
        return CompletionResponse(id=answer.id, created=now_s(), model=model, choices=choices, usage=answer.usage(),
                                  route=answer.route)

    def chat(self, body: ChatCompletionRequest, key_name: str | None) -> ChatCompletionResponse | Stream:
        model = self.served_model(body.model)
        if body.max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1 for a chat completion", "invalid_payload",
                           "max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs true", "invalid_payload", "top_logprobs")
        try:  # the template's refusals (roles out of order, no tokenizer) before any slot is taken
            prompt_ids = self.mesh.chat_prompt_ids([m.model_dump() for m in body.messages])
        except MeshError as err:
            raise ApiError(err.status, str(err), err.code, err.field) from None
        run_id = f"chatcmpl-{uuid.uuid4().hex}"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        run = self._generation(body, [prompt_ids], run_id, key_name, logprobs=logprobs)
        self._admit()

        def chunk(index: int, delta: dict, finish: str | None, logprobs=None) -> dict:
            return {"id": run_id, "object": "chat.completion.chunk", "created": now_s(), "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        if body.stream:
            texts: dict[int, TokenTexts] = {}

            def piece(index: int, text: str, _token: int, entry) -> dict:
                logprobs = None
                if entry is not None:
                    logprobs = texts.setdefault(index, TokenTexts(self.mesh, prompt_ids)).chat([entry])
                return chunk(index, {"content": text}, None, logprobs)

            def last(answer: Answer) -> list[dict]:
                chunks = [chunk(i, {}, g.finish_reason) for i, g in enumerate(answer.generations)]
                chunks[-1].update(usage=answer.usage(), route=answer.route)
                return chunks

            spec = StreamSpec(lambda index: chunk(index, {"role": "assistant", "content": ""}, None), piece, last)
            return self._stream(run, spec, body.n, body.stop_strings())
        answer = run()
        choices = [{"index": index, "message": {"role": "assistant", "content": g.text or ""},
                    "logprobs": TokenTexts(self.mesh, prompt_ids).chat(g.logprobs or []) if body.logprobs else None,
                    "finish_reason": g.finish_reason}
                   for index, g in enumerate(answer.generations)]
        return ChatCompletionResponse(id=answer.id, created=now_s(), model=model, choices=choices,
                                      usage=answer.usage(), route=answer.route)
