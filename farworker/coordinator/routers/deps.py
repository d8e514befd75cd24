"""The routes' dependencies: the coordinator's services and registry, from the app's state (set by create_app)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from farworker.coordinator import http
from farworker.coordinator.services.completions import Completions
from farworker.coordinator.services.registration import RegistrationGate
from farworker.coordinator.services.workers import Workers
from farworker.coordinator.settings import Settings
from farworker.coordinator.store import Store


def workers(request: Request) -> Workers:
    return request.app.state.workers


def store(request: Request) -> Store:
    return request.app.state.store


def settings(request: Request) -> Settings:
    return request.app.state.settings


def completions(request: Request) -> Completions:
    return request.app.state.completions


def registration_gate(request: Request) -> RegistrationGate:
    return request.app.state.registration_gate


def caller(request: Request) -> str | None:
    """The name of the API key the request carries (Authorization: Bearer KEY); None when no keys are set. Called
    in the route, after the body is validated (an invalid body is a 400 whatever the key)."""
    return request.app.state.completions.caller(request.headers.get("authorization", ""))


# The routes' parameters (FastAPI's Annotated dependencies).
WorkersDep = Annotated[Workers, Depends(workers)]
StoreDep = Annotated[Store, Depends(store)]
SettingsDep = Annotated[Settings, Depends(settings)]
CompletionsDep = Annotated[Completions, Depends(completions)]
GateDep = Annotated[RegistrationGate, Depends(registration_gate)]
SignedWorker = Annotated[str, Depends(http.worker_signature)]  # the worker id of a signed request for its own id
SignedRegistration = Annotated[str, Depends(http.registration_signature)]  # the registering peer id
