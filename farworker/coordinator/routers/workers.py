"""The signed worker routes: register, heartbeat, usage, deregister (farworker/wire_records.py's records)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter

from farworker.coordinator.errors import ApiError
from farworker.coordinator.routers import deps
from farworker.coordinator.schemas.common import ErrorResponse
from farworker.coordinator.schemas.workers import (
    DeregisterRequest,
    DeregisterResponse,
    HeartbeatResponse,
    RegisterResponse,
    UsageRequest,
    UsageResponse,
)
from farworker.coordinator.services import probe_order
from farworker.wire_records import HeartbeatRequest, RegisterRequest

log = logging.getLogger("farworker.coordinator")

router = APIRouter(tags=["workers"])
WORKER_ERRORS = {403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


@router.post(
    "/v1/workers/register",
    response_model=RegisterResponse,
    responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
               429: {"model": ErrorResponse, "description": "too many registrations from this source; Retry-After"},
               503: {"model": ErrorResponse, "description": "too many workers that have not proven themselves yet; "
                     "Retry-After"}},
)
def register(body: RegisterRequest, peer_id: deps.SignedRegistration,
             workers: deps.WorkersDep, gate: deps.GateDep) -> RegisterResponse:
    if body.peer_id != peer_id:
        raise ApiError(403, "peer_id in the body differs from the signing peer id", "forbidden", "peer_id")
    # the source's rate was checked before anything else (http.ShedRegistrations)
    registration, now = body.model_dump(), time.time()
    gate.check_allowed(registration)
    with gate.admission(peer_id, now):  # services/registration.py: the bound on unproven workers
        worker_id = workers.register(registration, now)
    span = f"{body.blocks[0]}:{body.blocks[1]}" if body.blocks else "not chosen yet"
    log.info("registered %s (peer %s) blocks %s of %s", worker_id, peer_id, span, body.model_name)
    return RegisterResponse(worker_id=worker_id, heartbeat_interval=workers.settings.heartbeat_interval_s)


@router.post("/v1/workers/{worker_id}/heartbeat", response_model=HeartbeatResponse, responses=WORKER_ERRORS)
def heartbeat(worker_id: str, body: HeartbeatRequest, _: deps.SignedWorker,
              workers: deps.WorkersDep) -> HeartbeatResponse:
    now = time.time()
    workers.store.heartbeat(worker_id, body.model_dump(), now)
    f = workers.figures(workers.store.worker_row(worker_id), now)
    return HeartbeatResponse(
        earn_rate_far_per_hour=f["earn_rate_far_per_hour"],
        reliability=f["reliability"],
        uptime_pct=f["uptime_pct"],
        uptime_new=f["uptime_new"],
        heartbeat_interval=workers.settings.heartbeat_interval_s,
        quarantined=f["quarantined"],
        settled_far=f["settled_far"],
        pending_far=f["pending_far"],
        forfeited_far=f["forfeited_far"],
        unreachable=f["reachability_problem"] or probe_order.problem(f["unanswered_probes"]),
    )


@router.post("/v1/workers/{worker_id}/usage", response_model=UsageResponse, responses=WORKER_ERRORS)
def usage(worker_id: str, body: UsageRequest, _: deps.SignedWorker,
          workers: deps.WorkersDep) -> UsageResponse:
    return UsageResponse(accepted=workers.add_usage(worker_id, [r.model_dump() for r in body.records], time.time()))


@router.post("/v1/workers/{worker_id}/deregister", response_model=DeregisterResponse, responses=WORKER_ERRORS)
def deregister(worker_id: str, _: deps.SignedWorker, workers: deps.WorkersDep,
               body: DeregisterRequest | None = None) -> DeregisterResponse:
    workers.store.set_state(worker_id, "offline")
    log.info("deregistered %s (%s)", worker_id, body.reason if body else "shutdown")
    return DeregisterResponse(worker_id=worker_id, state="offline")
