"""The reference coordinator's FastAPI app: create_app wires settings, store, services, runtime and routers."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry

from farworker.coordinator import http
from farworker.coordinator.errors import ApiError
from farworker.coordinator.routers import ledger, openai, workers
from farworker.coordinator.runtime import Runtime
from farworker.coordinator.schemas.common import ErrorResponse
from farworker.coordinator.services.completions import Completions
from farworker.coordinator.services.workers import Workers
from farworker.coordinator.settings import Settings
from farworker.coordinator.store import Store

API_DESCRIPTION = """\
Far Labs coordinator API: worker registration, signed heartbeats and usage reports, the earnings ledger,
and OpenAI-style completions routed through the Petals mesh. Served by `farworker coordinator`
(the reference coordinator); `openapi/farworker-api.yaml` is this document, checked by the tests.

**Signed worker requests.** Every `POST /v1/workers/...` carries four headers made with the worker's
persistent libp2p identity key (RSA; the same key gives the worker's DHT peer id):
`X-Far-Peer-Id` (base58 peer id), `X-Far-Timestamp` (integer unix seconds), `X-Far-Nonce` (8-128
printable ASCII characters, never reused) and `X-Far-Signature`: base64 RSA-PSS (MGF1-SHA256, salt
length 32) with SHA-256 over the UTF-8 bytes of
`FAR-SIG-V1\\n{METHOD}\\n{path}\\n{timestamp}\\n{nonce}\\n{hex sha256 of the body}`.
The coordinator checks that the peer id derives from the registered public key (for registration: from
the `public_key` in the body), the signature, a +/-60 s timestamp window, and refuses a nonce it has seen:
401 on any failure, 403 when a worker reports for another worker's id. Nothing is stored for a refused
request. Bodies over 1 MiB get 413; malformed bodies get 422 naming the field.

**Worker lifecycle.** A worker registers at start, before its weights are downloaded: `blocks` is null
unless its span is fixed, and its heartbeats say `joining`, with the span once known and a `phase` (what
it is doing, e.g. the download's progress). It registers again, keeping its worker id, when it knows more
(the model's block count, its addresses); then heartbeats `online` with its blocks, `draining` on
shutdown, and deregisters.

**Ledger.** Each usage record counts once (by id) as a *claim*: tokens x (blocks served / model blocks) x
reliability x FAR_PER_TOKEN, reliability = uptime share observed from heartbeats. What is *paid* is the
claims scaled to the share the coordinator attested: the routes of its own completions (peer, span, tokens
per server session) and direct clients' signed receipts (`POST /v1/receipts`, one per server session, from a
client key the operator registered). A worker's claims alone pay nothing, unless the operator sets a rate for
unvouched traffic (see docs/trust.md). Pay is `pending` for the settlement window (`--settle-after`), then
`settled`; a quarantine (a failed spot check) forfeits what is still pending.
"""


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The runtime's threads run while the app serves; on shutdown they stop (bounded, once), then the store
    closes."""
    app.state.runtime.start()
    try:
        yield
    finally:
        app.state.runtime.stop()
        app.state.store.close()


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``; its runtime starts and stops with the app's lifespan (uvicorn's)."""
    app = FastAPI(
        title="Far Labs coordinator API",
        version="1.0.0",
        description=API_DESCRIPTION,
        responses={
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
        lifespan=lifespan,
    )
    store = Store(settings.db_path)
    app.state.settings, app.state.store = settings, store
    app.state.metrics = CollectorRegistry()  # GET /metrics (Prometheus)
    store.write_refusals.export(app.state.metrics)  # whether the ledger database refuses writes (disk full)
    app.state.workers = Workers(store, settings)
    runtime = app.state.runtime = Runtime(settings, store, app.state.workers, app.state.metrics)
    # its parts, for operators and tests (None where not configured)
    app.state.mesh, app.state.routed_checks = runtime.mesh, runtime.routed_checks
    app.state.spot_checks, app.state.dht_watch = runtime.spot_checks, runtime.dht_watch
    app.state.session_audits = runtime.session_audits
    app.state.completions = Completions(settings, store, runtime)
    app.add_middleware(http.BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(ApiError, http.api_error)
    app.add_exception_handler(RequestValidationError, http.invalid_payload)
    for router in (workers.router, ledger.router, openai.router):
        app.include_router(router)
    http.document_signatures(app)
    return app
