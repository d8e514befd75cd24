"""A petals client that generates through the mesh and says who served it: one client path for everyone.

The coordinator uses it for the completions it routes (their routes are *attested*), and any direct client
uses it through ``farworker.vouching_client`` (their routes become signed *receipts*). The route comes from
petals' own inference session: each ``_ServerInferenceSession`` holds the span (peer id, start, end) it ran
on, its session id (the one the worker meters its usage under) and how many token positions it processed.
A span replaced mid-request (a worker died, petals re-routed) is recorded too, with the tokens it had
processed when it was dropped.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path

from farworker.petals import compat as petals_compat
from farworker.petals import prompt_logits

log = logging.getLogger("farworker.mesh_client")

# Bounded retries: petals' default is to retry forever, which would hang an HTTP request.
CLIENT_OPTIONS = {
    "max_retries": 3,
    "min_backoff": 0.5,
    "max_backoff": 5.0,
    "connect_timeout": 5.0,
    "request_timeout": 60.0,
    "update_period": 10.0,
    "ban_timeout": 5.0,
    "show_route": False,
}


# Below this temperature a request is answered greedily: sampling there only differs from the argmax on
# logits tied within ~1e-5, and far below it logits / temperature overflow float32 (inf, then NaN
# probabilities, and a request that fails after the workers served it).
GREEDY_BELOW_TEMPERATURE = 1e-6

# A generation whose session broke is run once more from the start in a fresh session.
GENERATION_ATTEMPTS = 2

CLOSE_TIMEOUT = 15.0  # seconds the client's shutdown may take before the process moves on


class MeshError(Exception):
    def __init__(
        self, message: str, status: int = 503, code: str = "mesh_unavailable", field: str | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


# The most alternatives a request may ask for per position (vLLM's default bound; OpenAI's chat allows 20).
MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """One position's token with its log-probability under the model (before temperature and top-p: what
    OpenAI and vLLM report) and the most likely tokens there, best first."""

    token: int
    logprob: float | None  # None: the prompt's first token (nothing before it predicts it)
    top: list[tuple[int, float]]


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str | None
    finish_reason: str
    route: list[dict]  # {"peer_id", "blocks": [start, end], "tokens", "session_id"}: one per server session
    id: str = ""  # the coordinator's id for the request, once recorded
    logprobs: list[TokenLogprob] | None = None  # one per completion token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked for (echo)


@dataclass(frozen=True)
class FirstStep:
    """One server session of a request, on its first step: the hidden states the client sent to the span (no past
    on the server: recomputable from scratch) and those the worker returned. The coordinator verifies a sample
    of them (coordinator/spot_check.RoutedChecks)."""

    peer_id: str
    span: tuple[int, int]
    session_id: str
    sent: object  # torch.Tensor [batch, positions, hidden]
    returned: object


class MeshClient:
    """One petals client, loaded on first use; each request runs in its own inference session, several at once
    (the coordinator bounds how many)."""

    def __init__(self, model_path: Path, initial_peers: list[str], dht_prefix: str | None, **client_options):
        self.model_path = Path(model_path)
        self.initial_peers = list(initial_peers)
        self.dht_prefix = dht_prefix
        self.client_options = {**CLIENT_OPTIONS, **client_options}
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._config = None

    def _load(self):
        if self._model is not None:
            return self._model
        if not self.initial_peers:
            raise MeshError("no initial peers configured for the mesh (--initial-peer)", code="no_mesh")
        from farworker.petals.compat import import_petals

        petals = import_petals()
        import torch

        try:
            # transformers builds the client's layers under accelerate's init_empty_weights, which patches torch for
            # the whole process: a local model built meanwhile in another thread got meta weights
            with petals_compat.MODULE_BUILD_LOCK:
                model = petals.AutoDistributedModelForCausalLM.from_pretrained(
                    str(self.model_path),
                    initial_peers=self.initial_peers,
                    dht_prefix=self.dht_prefix,
                    torch_dtype=torch.float32,
                    **self.client_options,
                )
        except Exception as err:
            raise MeshError(f"cannot start the mesh client for {self.model_path}: {err}") from None
        self._config = model.config
        prompt_logits.install(model)
        if any(
            (self.model_path / name).is_file()
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        ):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self._model = model
        return model

    def warm(self) -> None:
        with self._lock:
            self._load()

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer("prompt")
            ids = self._tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
        vocab = getattr(self._config, "vocab_size", None)
        if vocab and any(i >= vocab for i in ids):
            raise MeshError(
                f"prompt token ids must be below the vocabulary size {vocab}, got {max(ids)}",
                400,
                "invalid_payload",
                "prompt",
            )
        return ids

    def _need_tokenizer(self, field: str) -> None:
        if self._tokenizer is None:
            raise MeshError("this model has no tokenizer; send the prompt as a list of token ids", 400,
                            "invalid_payload", field)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation in the model's own chat template (Llama-2 chat: [INST] ... [/INST], <<SYS>>)."""
        with self._lock:
            self._load()
        self._need_tokenizer("messages")
        try:
            return list(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as err:  # the template's own checks (roles must alternate user/assistant)
            raise MeshError(f"messages: {err}", 400, "invalid_payload", "messages") from None

    def decode(self, ids: list[int]) -> str | None:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if self._tokenizer else None

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids (text through the model's tokenizer), checked against the vocabulary."""
        with self._lock:
            self._load()
        return self._prompt_ids(prompt)

    def token_texts(self, context: list[int], token: int, others=()) -> tuple[str, list[str]]:
        """The text ``token`` adds after ``context`` (a few tokens before it: a sentencepiece word's leading space
        and byte-level tokens only decode in context), and the text each of ``others`` would have added there.
        Without a tokenizer, OpenAI's and vLLM's ``token_id:N``."""
        if self._tokenizer is None:
            return f"token_id:{token}", [f"token_id:{t}" for t in others]
        before = list(context[-4:])
        head = self._tokenizer.decode(before, skip_special_tokens=False)

        def added(t: int) -> str:
            text = self._tokenizer.decode(before + [t], skip_special_tokens=False)
            return text[len(head):] if text.startswith(head) else self._tokenizer.decode([t])

        return added(token), [added(t) for t in others]

    def generate(self, prompt: str | list[int], max_tokens: int, temperature: float, *, top_p: float = 1.0,
                 seed: int | None = None, stop: tuple[str, ...] = (), on_token=None,
                 cancelled: threading.Event | None = None, first_steps=None, audits=None,
                 logprobs: int | None = None, echo: bool = False) -> Generation:
        """One completion in its own petals inference session; many may run at once (one per thread).

        ``logprobs`` (0..MAX_TOP_LOGPROBS; None: none) gives each completion token's log-probability and that many
        alternatives; ``echo`` gives the prompt's too, from the same first forward (``max_tokens`` 0: that forward
        alone, in an inference session like any other, so the workers meter it and the audits may watch it).

        ``on_token(token_id, TokenLogprob | None)`` is called as each new token arrives (streaming); ``cancelled``
        set ends the generation at the next token (a client that went away): what was served so far is still routed
        and returned. ``stop`` strings end it once the decoded completion contains one (the text is cut
        before it). ``first_steps`` (the coordinator's routed checks: ``sample() -> bool`` as the request starts,
        ``submit(FirstStep)`` once it is done; None: nothing is captured) takes one server session's first step of
        a sampled request. ``audits`` (the coordinator's session audits, coordinator/services/audit.SessionAudits:
        ``watch(peer_id, span, session_id)`` as petals opens each server session, a SessionCapture or None;
        ``submit(captures)`` once the request is over) keeps every step of the server sessions it chooses."""
        with self._lock:
            self._load()
        ids = self._prompt_ids(prompt)
        if stop:
            self._need_tokenizer("stop")
        limit = getattr(self._config, "max_position_embeddings", None)
        if limit and len(ids) + max_tokens > limit:
            raise MeshError(
                f"prompt + max_tokens = {len(ids) + max_tokens} exceeds the model's {limit} positions",
                400,
                "invalid_payload",
                "max_tokens",
            )
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if temperature >= GREEDY_BELOW_TEMPERATURE
            else {"do_sample": False}
        )
        scorer = _StepScores(logprobs) if logprobs is not None else None
        watcher = _TokenWatcher(self, stop, on_token, cancelled, scorer)
        captured: list | None = [] if first_steps is not None and first_steps.sample() else None  # FirstStep each
        seen: list = []  # every server session of every attempt: each one's tokens were served and billed
        audited = _Audited(audits)  # every step of the server sessions the audits choose, every attempt
        first_logits: list = []  # the first forward's logits, every prompt position (echo)
        for attempt in range(1, GENERATION_ATTEMPTS + 1):
            try:
                with prompt_logits_capture(echo) as first_logits:
                    if max_tokens == 0:
                        output = self._forward_once(ids, seen, captured, audited)
                    else:
                        output = self._generate_once(ids, max_tokens, sampling, seed, watcher, seen, captured,
                                                     audited, scorer)
                break
            except _Cancelled:
                output = None
                break
            except Exception as err:
                # petals re-routes a step itself, but a replacement server that cannot rebuild the cache
                # ("Broken input cache", a worker draining mid-session) ends the session. A stream that already
                # sent tokens cannot take them back: it is retried only if a retry repeats them (greedy).
                if attempt < GENERATION_ATTEMPTS and (not watcher.tokens or not sampling["do_sample"]):
                    log.warning("completion failed in the mesh, retrying in a fresh session: %s", err)
                    watcher.restart()
                    continue
                log.warning("completion failed in the mesh: %s", err)
                audited.submit()  # the steps it answered are audited all the same
                raise MeshError(f"the mesh could not serve the request: {err}") from None
        audited.submit()  # audited later in the audits' thread, never here
        if max_tokens == 0:
            completion = []
        else:
            completion = watcher.tokens if output is None or watcher.stopped else output[0, len(ids):].tolist()
        eos = getattr(self._config, "eos_token_id", None)
        if max_tokens == 0:
            finish = "length"
        elif watcher.stopped or output is None:
            finish = "stop"
        else:
            finish = ("stop" if len(completion) < max_tokens or (eos is not None and completion[-1:] == [eos])
                      else "length")
        route = [
            {
                "peer_id": s.span.peer_id.to_base58(),
                "blocks": [int(s.span.start), int(s.span.end)],
                "tokens": petals_compat.tokens_processed(s),
                "session_id": str(s.session_id),  # the id the worker's usage records carry
            }
            for s in seen
            if petals_compat.tokens_processed(s) > 0
        ]
        if captured:  # one server session, at random; verified later in the checker's thread, never here
            first_steps.submit(random.choice(captured))
        generation = Generation(ids, completion, watcher.text(completion), finish, route)
        if scorer is not None:
            generation.logprobs = watcher.entries[:len(completion)]
        if echo:
            generation.prompt_logprobs = _prompt_entries(ids, first_logits[0] if first_logits else None,
                                                         logprobs or 0)
        return generation

    @contextlib.contextmanager
    def _session(self, max_length: int, seen: list, captured: list | None, audited: _Audited | None):
        """An inference session with the request's route tracked and its steps offered to the checks."""
        with self._model.inference_session(max_length=max_length) as session:
            self._track(session, seen)
            if captured is not None:
                petals_compat.on_first_steps(session, lambda *first_step: _capture(captured, *first_step))
            if audited is not None and audited.audits is not None:
                petals_compat.on_every_step(session, audited.watch)
            try:
                yield session
            finally:
                _keep(seen, petals_compat.server_sessions_of(session))

    def _generate_once(self, ids: list[int], max_tokens: int, sampling: dict, seed: int | None, watcher, seen: list,
                       captured: list | None = None, audited: _Audited | None = None, scorer=None):
        import torch

        model = self._model
        with self._session(len(ids) + max_tokens, seen, captured, audited) as session:
            if seed is not None and sampling["do_sample"]:
                torch.manual_seed(seed)  # per thread's generator would be better; torch has one global CPU RNG
            with torch.inference_mode():
                return model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_tokens,
                    session=session,
                    pad_token_id=getattr(self._config, "pad_token_id", None) or 0,
                    streamer=watcher,
                    logits_processor=[scorer] if scorer is not None else None,
                    **sampling,
                )

    def _forward_once(self, ids: list[int], seen: list, captured: list | None, audited: _Audited | None):
        """The prompt through the mesh once, no token generated (echo with max_tokens 0)."""
        import torch

        with self._session(len(ids), seen, captured, audited), torch.inference_mode():
            self._model(torch.tensor([ids]))
        return None

    @staticmethod
    def _track(session, seen: list) -> None:
        """Keep each server session petals drops while re-routing after a failure, to count its tokens."""
        petals_compat.on_server_sessions_dropped(session, lambda server_sessions: _keep(seen, server_sessions))

    def close(self) -> None:
        with self._lock:
            model, self._model = self._model, None
        if model is not None:
            manager = model.transformer.h.sequence_manager

            def shut_down():
                with contextlib.suppress(Exception):  # best effort: stop the route updates, then the DHT and p2pd
                    manager.shutdown()
                with contextlib.suppress(Exception):
                    manager.dht.shutdown()

            # petals joins its route-update thread without a timeout; that thread may be inside a DHT query
            # to peers that are already gone. A shutdown must not hang the coordinator's exit.
            closer = threading.Thread(target=shut_down, name="mesh-client-close", daemon=True)
            closer.start()
            closer.join(CLOSE_TIMEOUT)
            _give_this_thread_an_event_loop()


def _give_this_thread_an_event_loop() -> None:
    """hivemind's p2pd client objects, collected later in this thread, look up its event loop in __del__;
    under uvloop's policy a thread without one raises there and prints a traceback at exit."""
    import asyncio

    try:
        asyncio.get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


def _capture(captured: list, server_session, sent, returned) -> None:
    try:
        span = server_session.span
        captured.append(FirstStep(span.peer_id.to_base58(), (int(span.start), int(span.end)),
                                  str(server_session.session_id), sent, returned))
    except Exception:  # a spot check must never fail the request it samples
        log.exception("could not capture a first step for a routed check")


class _Audited:
    """The server sessions of one request that the coordinator's audits chose, each captured step by step."""

    def __init__(self, audits):
        self.audits = audits
        self.captures: list = []

    def watch(self, peer_id: str, span: tuple[int, int], session_id: str):
        try:
            capture = self.audits.watch(peer_id, span, session_id)
        except Exception:  # an audit must never fail the request it watches
            log.exception("could not choose whether to audit a server session")
            return None
        if capture is None:
            return None
        self.captures.append(capture)

        def record(*step):
            try:
                capture.add(*step)
            except Exception:  # nor may keeping a step: the session is then not audited, and counted so
                log.exception("could not capture a step for an audit")
                capture.give_up("the capture failed")

        return record

    def submit(self) -> None:
        if self.audits is not None:
            captures, self.captures = self.captures, []
            self.audits.submit(captures)


@contextlib.contextmanager
def prompt_logits_capture(wanted: bool):
    if not wanted:
        yield []
        return
    with prompt_logits.first_forward_logits() as target:
        yield target


def _top(logprobs, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]))
    return list(zip(indices.tolist(), values.tolist(), strict=True))


def _prompt_entries(ids: list[int], logits, k: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (the first: None, as OpenAI and vLLM)."""
    import torch

    if logits is None:
        raise MeshError("the mesh's forward gave no prompt logits")
    entries = [TokenLogprob(ids[0], None, [])]
    for i in range(1, len(ids)):  # row by row: a long prompt's [positions, vocab] is not copied whole again
        row = torch.log_softmax(logits[0, i - 1].float(), dim=-1)
        entries.append(TokenLogprob(ids[i], float(row[ids[i]]), _top(row, k)))
    return entries


class _StepScores:
    """A logits processor that keeps each step's log-softmax of the model's scores (first in transformers' list,
    so before temperature and top-p) for the token the step then picks."""

    def __init__(self, k: int):
        self.k = k
        self.last = None

    def __call__(self, input_ids, scores):
        import torch

        self.last = torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def entry(self, token: int) -> TokenLogprob | None:
        if self.last is None:
            return None
        return TokenLogprob(token, float(self.last[token]), _top(self.last, self.k))


def _keep(seen: list, server_sessions) -> None:
    for server_session in server_sessions:
        if not any(server_session is known for known in seen):
            seen.append(server_session)


class _Cancelled(Exception):
    """Raised inside generate (from the streamer) to end a generation the client no longer waits for."""


class _TokenWatcher:
    """transformers' streamer interface: sees each new token as it is generated, feeds ``on_token``, ends the
    generation on a stop string or a cancellation."""

    def __init__(self, mesh: MeshClient, stop: tuple[str, ...], on_token, cancelled: threading.Event | None,
                 scorer: _StepScores | None = None):
        self.mesh, self.stop, self.on_token, self.cancelled, self.scorer = mesh, stop, on_token, cancelled, scorer
        self.tokens: list[int] = []
        self.entries: list[TokenLogprob] = []  # each token's log-probabilities (with a scorer)
        self.stopped = False  # a stop string appeared
        self._prompt_seen = False
        self._replay = 0  # tokens a retry regenerates that were passed on already

    def restart(self) -> None:
        """A retry regenerates from the prompt; tokens already passed on are not passed on again."""
        self._prompt_seen = False
        self._replay = len(self.tokens)
        self.tokens = []
        self.entries = []

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        if self.cancelled is not None and self.cancelled.is_set():
            raise _Cancelled()
        for token in value.reshape(-1).tolist():
            self.tokens.append(int(token))
            entry = self.scorer.entry(int(token)) if self.scorer is not None else None
            if entry is not None:
                self.entries.append(entry)
            if len(self.tokens) > self._replay and self.on_token is not None:
                self.on_token(int(token), entry)
        if self.stop and any(s in (self.mesh.decode(self.tokens) or "") for s in self.stop):
            self.stopped = True
            raise _Cancelled()

    def end(self) -> None:
        pass

    def text(self, completion: list[int]) -> str | None:
        text = self.mesh.decode(completion)
        if text is not None and self.stopped:
            cut = min((text.find(s) for s in self.stop if s in text), default=len(text))
            text = text[:cut]
        return text
