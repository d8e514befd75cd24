"""The ledger's views: workers, hosts, API keys' usage, receipts that vouch for direct traffic, /metrics and
/healthz."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from farworker.coordinator.errors import ApiError
from farworker.coordinator.routers import deps
from farworker.coordinator.schemas.common import ErrorResponse
from farworker.coordinator.schemas.ledger import (
    HostList,
    KeyUsageList,
    ReceiptsRequest,
    ReceiptsResponse,
    WorkerList,
    WorkerView,
)
from farworker.coordinator.services.hosts import group_by_host
from farworker.coordinator.services.paging import DEFAULT_LIMIT, MAX_LIMIT
from farworker.coordinator.services.receipts import check_receipts

router = APIRouter(tags=["ledger"])
PAGE_ERRORS = {400: {"model": ErrorResponse}}
# Bad values answer 400 naming the field (http.invalid_payload: a query parameter is the client's request, not a
# payload).
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"items per page, 1..{MAX_LIMIT}")]
Cursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page; none: the first")]


@router.post(
    "/v1/receipts",
    response_model=ReceiptsResponse,
    responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)
def receipts(body: ReceiptsRequest, settings: deps.SettingsDep,
             store: deps.StoreDep) -> ReceiptsResponse:
    """Direct clients vouch for the server sessions workers ran for them (farworker/receipts.py). Each
    receipt must come from a registered client key and verify; the batch is refused whole, naming the first
    bad receipt, and nothing is stored. A receipt counts once, and only for the peer it names."""
    checked = check_receipts([r.model_dump() for r in body.receipts], settings.client_keys, settings.model_blocks)
    accepted, duplicates = store.add_receipts(checked, time.time())
    return ReceiptsResponse(accepted=accepted, duplicates=duplicates)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text: the routed spot checks' outcomes (farworker_coordinator_routed_checks_total)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", include_in_schema=False)
def healthz(request: Request) -> Response:
    """For a load balancer's health check: 200 while this replica reaches the database, with the background-loops
    lease as this replica sees it (services/lease.py); 503 when the database does not answer."""
    try:
        view = request.app.state.runtime.lease_view()  # reads the lease row: a database round trip
    except Exception as err:  # any database failure means: send traffic elsewhere
        return JSONResponse({"status": "unavailable", "error": f"database: {type(err).__name__}"}, status_code=503)
    return JSONResponse({"status": "ok", **view})


@router.get("/v1/workers", response_model=WorkerList, responses=PAGE_ERRORS)
def list_workers(workers: deps.WorkersDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> WorkerList:
    """The workers in registration order, a page at a time (follow next_cursor)."""
    views, next_cursor = workers.page(limit, cursor)
    return WorkerList(workers=views, next_cursor=next_cursor)


@router.get("/v1/hosts", response_model=HostList, responses=PAGE_ERRORS)
def list_hosts(workers: deps.WorkersDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> HostList:
    """The workers grouped by the host they registered from (one worker per GPU): earnings per host, a page of
    hosts at a time (follow next_cursor)."""
    views, next_cursor = workers.hosts_page(limit, cursor)
    return HostList(hosts=group_by_host(views), next_cursor=next_cursor)


@router.get("/v1/workers/{worker_id}", response_model=WorkerView, responses={404: {"model": ErrorResponse}})
def get_worker(worker_id: str, workers: deps.WorkersDep) -> WorkerView:
    row = workers.store.worker_row(worker_id)
    if row is None:
        raise ApiError(404, f"unknown worker {worker_id}", "unknown_worker")
    return workers.view(row, time.time())


@router.get("/v1/usage", response_model=KeyUsageList)
def key_usage(store: deps.StoreDep) -> KeyUsageList:
    """Completions and tokens per API key (empty while the API is open)."""
    return KeyUsageList(keys=store.key_usage())
