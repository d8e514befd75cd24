"""OpenAI's records as the coordinator serves them: completions, chat completions, models, and its error object."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from farworker.wire_records import StrictRecord

MAX_CHOICES = 8  # n
MAX_PROMPTS = 32  # a completion's list of prompts (lm-evaluation-harness sends its batch as one)
MAX_TOP_LOGPROBS = 20  # alternatives per position: OpenAI's chat bound (its completions stop at 5, vLLM's at 20)


class _Generation(StrictRecord):
    """The generation fields shared by completions and chat completions (OpenAI's names and meanings)."""

    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=16, ge=0, le=4096,
                            description="tokens to generate; 0 only with a completion's echo (score the prompt)")
    temperature: float = Field(
        default=0.0, ge=0, le=10, description="0 = greedy (and so is any temperature below 1e-6); greedy by default"
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling (with a temperature above 0)")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1,
                             description="sampling seed: the same seed gives the same tokens when run alone")
    stop: str | Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)] | None = (
        Field(default=None, description="up to 4 strings; the completion ends before the first one (needs text)"))
    n: int = Field(default=1, ge=1, le=MAX_CHOICES,
                   description=f"choices per prompt, up to {MAX_CHOICES}: each its own inference session (petals "
                               "cannot share a prefill between sessions); with a seed, choice i samples with seed + i")
    stream: bool = Field(default=False, description="server-sent events, one per token, then data: [DONE]")
    user: str | None = Field(default=None, max_length=256, description="the end user, for the operator's records")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _one_prompt(value) -> bool:
    return (isinstance(value, str) and len(value) > 0) or (
        isinstance(value, list) and len(value) > 0 and all(type(i) is int and i >= 0 for i in value))


class CompletionRequest(_Generation):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]] = Field(
        description=f"text (needs a tokenizer) or token ids; or a list of up to {MAX_PROMPTS} of either (one "
                    "choice per prompt and n)"
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS,
        description="each token's log-probability (before temperature and top-p) and this many most likely "
                    f"alternatives, up to {MAX_TOP_LOGPROBS} (OpenAI stops at 5; lm-evaluation-harness 0.4.1 asks "
                    "for 10)")
    echo: bool = Field(default=False, description="the prompt's tokens (with logprobs: their log-probabilities, "
                                                  "the first one null) before the completion; not streamed")
    best_of: int | None = Field(default=None, description="not supported: send n for several choices")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_or_token_ids(cls, value):
        """One error naming ``prompt``, where the union would name its members (prompt.str,
        prompt.list[constrained-int].0); and JSON true/false or 2.0 are not token ids."""
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(value)}")
            if not all(_one_prompt(p) for p in value):
                raise ValueError("each prompt of a list must be non-empty text or a non-empty list of token ids "
                                 "(integers >= 0)")
            return value
        if not _one_prompt(value):
            raise ValueError("prompt must be non-empty text or a non-empty list of token ids (integers >= 0), or a "
                             "list of those")
        return value

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, value):
        if value is not None and value != 1:
            raise ValueError("best_of is not supported (the mesh does not rank candidates); send n for several "
                             "choices")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or several."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str | list):
            return list(self.prompt)
        return [self.prompt]


class ChatMessage(StrictRecord):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000, description="text (content parts are not supported)")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = Field(default=False, description="each content token's log-probability (before temperature "
                                                      "and top-p)")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: this many most likely alternatives per token")


class Contribution(BaseModel):
    peer_id: str
    worker_id: str | None
    blocks: list[int]
    tokens: int = Field(description="tokens this span processed for the request")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: one entry per token of the choice's text (with echo, the prompt's first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str | None
    token_ids: list[int]
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    route: list[Contribution] = Field(description="which workers served which blocks for this request")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    route: list[Contribution] = Field(description="which workers served which blocks for this request")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "far-mesh"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_error(status: int, message: str, code: str, param: str | None) -> dict:
    """OpenAI's error object: what its clients parse into their exceptions."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
