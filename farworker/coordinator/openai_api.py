"""The OpenAI-compatible side of the coordinator: admission (how many generations at once), the error shape
clients expect, and server-sent-event streams of completions and chat completions.

Every generation runs in its own thread and petals inference session (`MeshClient.generate`); at most
``max_active`` at once, ``max_queued`` more wait, and beyond that a request gets 429 with Retry-After. A
streamed request whose client goes away is cancelled at the next token; what the mesh served until then is
still recorded as the request's route (attested, so the workers are paid for it).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


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


def openai_error(status: int, message: str, code: str, param: str | None) -> dict:
    """OpenAI's error object: what its clients parse into their exceptions."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
