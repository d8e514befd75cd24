"""OpenAI-style inference routes: models, completions, chat completions (services/completions.py does the work)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from farworker.coordinator.errors import ApiError
from farworker.coordinator.routers import deps
from farworker.coordinator.schemas.common import ErrorResponse
from farworker.coordinator.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from farworker.coordinator.services.completions import Stream

router = APIRouter(tags=["inference"])
GENERATION_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                     503: {"model": ErrorResponse}}


def _answer(result):
    if isinstance(result, Stream):
        return StreamingResponse(result.events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return result


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request, service: deps.CompletionsDep) -> ModelList:
    deps.caller(request)
    return ModelList(data=[ModelCard(id=name, created=service.started) for name in service.model_names()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
def get_model(model_id: str, request: Request, service: deps.CompletionsDep) -> ModelCard:
    deps.caller(request)
    if model_id not in service.model_names():
        raise ApiError(404, f"model {model_id!r} is not served here", "unknown_model", "model")
    return ModelCard(id=model_id, created=service.started)


@router.post("/v1/completions", response_model=CompletionResponse, responses=GENERATION_ERRORS)
def completions(body: CompletionRequest, request: Request, service: deps.CompletionsDep):
    return _answer(service.complete(body, deps.caller(request)))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_ERRORS)
def chat_completions(body: ChatCompletionRequest, request: Request,
                     service: deps.CompletionsDep):
    return _answer(service.chat(body, deps.caller(request)))
