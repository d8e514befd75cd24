"""OpenAI's records as the coordinator serves them: completions, chat completions, models, and its error object."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from farworker.wire_records import StrictRecord


class _Generation(StrictRecord):
    """The generation fields shared by completions and chat completions (OpenAI's names and meanings)."""

    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(
        default=0.0, ge=0, le=10, description="0 = greedy (and so is any temperature below 1e-6); greedy by default"
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling (with a temperature above 0)")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1,
                             description="sampling seed: the same seed gives the same tokens when run alone")
    stop: str | Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)] | None = (
        Field(default=None, description="up to 4 strings; the completion ends before the first one (needs text)"))
    n: int = Field(default=1, ge=1, le=1, description="choices per request: 1")
    stream: bool = Field(default=False, description="server-sent events, one per token, then data: [DONE]")
    user: str | None = Field(default=None, max_length=256, description="the end user, for the operator's records")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Generation):
    prompt: str | list[Annotated[int, Field(ge=0)]] = Field(
        description="text (needs a tokenizer) or token ids"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_or_token_ids(cls, value):
        """One error naming ``prompt``, where the union would name its members (prompt.str,
        prompt.list[constrained-int].0); and JSON true/false or 2.0 are not token ids."""
        if not isinstance(value, str) and not (
            isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)
        ):
            raise ValueError("prompt must be text or a list of token ids (integers >= 0)")
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value


class ChatMessage(StrictRecord):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000, description="text (content parts are not supported)")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class Contribution(BaseModel):
    peer_id: str
    worker_id: str | None
    blocks: list[int]
    tokens: int = Field(description="tokens this span processed for the request")


class CompletionChoice(BaseModel):
    index: int
    text: str | None
    token_ids: list[int]
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


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
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
