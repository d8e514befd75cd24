"""The reference coordinator's HTTP API (FastAPI): worker registration, signed heartbeats and usage,
the earnings ledger, and OpenAI-style completions routed through the mesh."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from farworker.coordinator import ledger, reachability
from farworker.coordinator.hosts import group_by_host
from farworker.coordinator.models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DeregisterRequest,
    DeregisterResponse,
    ErrorResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    HostList,
    KeyUsageList,
    ModelCard,
    ModelList,
    ReceiptsRequest,
    ReceiptsResponse,
    RegisterRequest,
    RegisterResponse,
    UsageRequest,
    UsageResponse,
    WorkerList,
    WorkerView,
)
from farworker.coordinator.openai_api import (
    OPENAI_PATHS,
    Admission,
    Busy,
    StreamSpec,
    now_s,
    openai_error,
    sse_stream,
)
from farworker.coordinator.store import Store
from farworker.identity import HEADER_PEER_ID, SignatureError, verify_request
from farworker.petals.server_host import dht_prefix_for

log = logging.getLogger("farworker.coordinator")

BODY_KEY = "farworker.body"

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
unvouched traffic (see farworker/coordinator/ledger.py and docs/trust.md).
"""


DEFAULT_SAMPLE_ROUTED = 0.05  # one routed completion in 20 (docs/trust.md, "Spot checks": its cost)


@dataclass
class Settings:
    db_path: Path
    heartbeat_interval_s: float = 30.0
    signature_window_s: int = 60
    max_body_bytes: int = 1 << 20
    far_per_token: float = ledger.DEFAULT_FAR_PER_TOKEN
    # the mesh, for /v1/completions (none configured: the route answers 503)
    model_path: Path | None = None
    model_name: str | None = None  # names the model for the ledger and the DHT prefix; default: dir name
    initial_peers: tuple[str, ...] = ()
    dht_prefix: str | None = None
    model_blocks: dict[str, int] = field(default_factory=dict)  # model name -> block count, for the ledger
    probe_period_s: float = 300.0  # spot checks of each online worker (with a model configured); 0: none
    # Share of routed completions whose first step on one worker is verified (spot_check.RoutedChecks); None:
    # DEFAULT_SAMPLE_ROUTED with probes on, 0 with probes off (probe_period_s 0: no spot checks of any kind).
    sample_routed: float | None = None
    max_active_generations: int = 8  # petals inference sessions the coordinator runs at once
    # Requests waiting for a slot; beyond: 429 with Retry-After. A waiting (or running) non-streamed request holds
    # one of the server's 40 request threads, which the workers' heartbeats need too: 8 + 16 leaves them 16.
    max_queued_generations: int = 16
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> its name; empty: the inference API is open
    # direct clients whose receipts vouch for traffic: key id -> (name, Ed25519 public key, base64); empty: none
    client_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    pay_unvouched_rate: float = 0.0  # share of claims nobody attested or vouched for that is paid anyway (0..1)

    def __post_init__(self):
        self.db_path = Path(self.db_path)
        if self.sample_routed is None:
            self.sample_routed = DEFAULT_SAMPLE_ROUTED if self.probe_period_s > 0 else 0.0
        if self.model_path is not None:
            self.model_path = Path(self.model_path)
            self.model_name = self.model_name or self.model_path.name
            # the prefix the workers' petals servers announce under (farworker.petals.server_host does the same)
            self.dht_prefix = self.dht_prefix or dht_prefix_for(self.model_name)
            config = self.model_path / "config.json"
            if config.is_file() and self.model_name not in self.model_blocks:
                layers = json.loads(config.read_text()).get("num_hidden_layers")
                if isinstance(layers, int) and layers > 0:
                    self.model_blocks[self.model_name] = layers


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.field = status, message, code, field


def _error(status: int, message: str, code: str, field: str | None = None, **extra) -> JSONResponse:
    body = {"error": message, "code": code, "field": field, **extra}
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """Reads the whole request body (at most ``limit`` bytes) before the app sees it: bigger bodies get
    413 without being buffered, and the signature check gets the exact bytes that were sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scope[BODY_KEY] = body
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"request body over {self.limit} bytes", "body_too_large")
        await response(scope, receive, send)


def _signed_path(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.db_path)
    mesh = None
    if settings.model_path is not None:
        from farworker.coordinator.mesh import MeshClient

        mesh = MeshClient(settings.model_path, list(settings.initial_peers), settings.dht_prefix)

    app = FastAPI(
        title="Far Labs coordinator API",
        version="1.0.0",
        description=API_DESCRIPTION,
        responses={
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
    app.state.settings, app.state.store, app.state.mesh = settings, store, mesh
    app.state.metrics = CollectorRegistry()  # GET /metrics (Prometheus)
    app.state.routed_checks = None
    if mesh is not None and settings.sample_routed > 0:
        from farworker.coordinator.spot_check import RoutedChecks, SpotChecker

        app.state.routed_checks = RoutedChecks(SpotChecker(mesh), store, settings.sample_routed,
                                               registry=app.state.metrics).start()
        mesh.routed_checks = app.state.routed_checks
    app.state.spot_checks = None
    if mesh is not None and settings.probe_period_s > 0:
        from farworker.coordinator.spot_check import SpotChecker, SpotCheckLoop

        def workers_to_probe():
            now = time.time()
            rows = (store.worker_row(w) for w in store.worker_ids())
            return [r for r in rows if r["block_start"] is not None and live_state(r, now) == "online"]

        app.state.spot_checks = SpotCheckLoop(SpotChecker(mesh), store, settings.probe_period_s,
                                              workers_to_probe).start()
    # Uptime is what the coordinator observed: with a mesh view, a beat counts only in an interval where the DHT
    # also showed the worker's span ONLINE (coordinator/dht_watch.py).
    watches_dht = mesh is not None and bool(settings.initial_peers)
    app.state.dht_watch = None
    if watches_dht:
        from farworker.coordinator.dht_watch import DhtWatch

        def workers_to_watch():
            now = time.time()
            rows = (store.worker_row(w) for w in store.worker_ids())
            return [r for r in rows if r["model_name"] == settings.model_name
                    and live_state(r, now) not in ("offline", "quarantined")]

        app.state.dht_watch = DhtWatch(mesh, store, settings.heartbeat_interval_s, settings.dht_prefix,
                                       lambda: settings.model_blocks.get(settings.model_name),
                                       workers_to_watch).start()
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def for_openai(request: Request) -> bool:
        return request.url.path.startswith(OPENAI_PATHS)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        if for_openai(request):
            headers = {"Retry-After": "1"} if err.status == 429 else None
            return JSONResponse(openai_error(err.status, err.message, err.code, err.field), err.status, headers)
        return _error(err.status, err.message, err.code, err.field)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        problems = err.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        name = ".".join(loc) or None
        message = f"invalid {name or 'payload'}: {first.get('msg')}"
        if for_openai(request):  # OpenAI answers an invalid request with 400 and its error object
            return JSONResponse(openai_error(400, message, "invalid_payload", name), 400)
        detail = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")}
            for e in problems
        ]
        return _error(422, message, "invalid_payload", name, detail=detail)

    def _check(public_key: str, request: Request) -> str:
        try:
            peer_id, nonce, _ = verify_request(
                public_key,
                request.method,
                _signed_path(request),
                request.scope.get(BODY_KEY, b""),
                request.headers,
                window_s=settings.signature_window_s,
            )
        except SignatureError as err:
            raise ApiError(401, str(err), "bad_signature") from None
        if not store.consume_nonce(peer_id, nonce, time.time(), keep_s=3 * settings.signature_window_s):
            raise ApiError(401, "nonce already used (replayed request)", "replay")
        return peer_id

    def registration_signature(request: Request) -> str:
        """The registering worker proves it holds the key its body carries."""
        try:
            body = json.loads(request.scope.get(BODY_KEY, b"") or b"null")
        except ValueError:
            raise ApiError(422, "invalid payload: body is not JSON", "invalid_payload") from None
        public_key = body.get("public_key") if isinstance(body, dict) else None
        if not isinstance(public_key, str):
            raise ApiError(
                422,
                "invalid public_key: a base64 DER RSA public key is required",
                "invalid_payload",
                "public_key",
            )
        if not request.headers.get(HEADER_PEER_ID):
            raise ApiError(401, f"missing header {HEADER_PEER_ID}", "bad_signature")
        return _check(public_key, request)

    def worker_signature(request: Request) -> str:
        """A registered worker's request, for its own worker id; returns the worker id."""
        peer_id = request.headers.get(HEADER_PEER_ID)
        if not peer_id:
            raise ApiError(401, f"missing header {HEADER_PEER_ID}", "bad_signature")
        public_key = store.public_key_of(peer_id)
        if public_key is None:
            raise ApiError(401, "unknown peer id; register first", "unregistered")
        _check(public_key, request)
        worker_id = request.path_params["worker_id"]
        row = store.worker_row(worker_id)
        if row is None:
            raise ApiError(404, f"unknown worker {worker_id}; register again", "unknown_worker")
        if row["peer_id"] != peer_id:
            raise ApiError(403, f"worker {worker_id} belongs to another peer id", "forbidden")
        return worker_id

    def total_blocks_of(row) -> int | None:
        """None while neither the coordinator nor the worker knows the model's size and the worker has
        not reported its span yet (it registered before loading)."""
        return settings.model_blocks.get(row["model_name"]) or row["total_blocks"] or row["block_end"]

    def uptime(row, now: float) -> float:
        return ledger.uptime_fraction(
            store.up_intervals(row["worker_id"], watches_dht), row["registered_at"], now, row["heartbeat_interval"]
        )

    def figures(row, now: float) -> dict:
        """Claimed, attested and paid (farworker/coordinator/ledger.py): paid never exceeds attested, and
        nothing received after a quarantine pays."""
        observed = uptime(row, now)
        window = ledger.earn_rate_window(row["registered_at"], now, row["heartbeat_interval"])
        t = store.ledger_totals(row["worker_id"], now - window)
        covered_tb = t["attested_token_blocks"] + t["vouched_token_blocks"]
        covered_share = ledger.attested_fraction(t["claimed_token_blocks"], covered_tb)
        paid = ledger.paid_far(t["payable_by_price"], t["claimed_token_blocks"], covered_tb,
                               settings.pay_unvouched_rate)
        paid_share = paid / t["payable_far"] if t["payable_far"] > 0 else 0.0
        over = ledger.over_claimed(t["claimed_tokens"], t["attested_tokens"] + t["vouched_tokens"])
        reliability = observed * (covered_share if over else 1.0)
        quarantined = t["quarantine"]
        return {
            "tokens_served": t["claimed_tokens"],
            "tokens_attested": t["attested_tokens"],
            "unattested_tokens": max(0, t["claimed_tokens"] - t["attested_tokens"]),
            "tokens_vouched": t["vouched_tokens"],
            "unvouched_tokens": max(0, t["claimed_tokens"] - t["attested_tokens"] - t["vouched_tokens"]),
            "claimed_far": round(t["claimed_far"], 9),
            "earnings_far": round(paid, 9),
            "reliability": 0.0 if quarantined else round(reliability, 6),
            "uptime_pct": round(100 * observed, 3),
            "up_intervals": store.up_intervals(row["worker_id"], watches_dht),
            "uptime_basis": "beats_and_dht" if watches_dht else "beats",
            "earn_rate_far_per_hour": round(t["payable_far_recent"] * paid_share * 3600 / window, 9),
            "quarantined": quarantined["reason"] if quarantined else None,
            **store.probe_summary(row["worker_id"]),
            **(app.state.routed_checks.view(row["worker_id"]) if app.state.routed_checks is not None
               else {"routed_checks": 0, "routed_checks_failed": 0}),
            **reachability.view(row["reachability"]),
        }

    def live_state(row, now: float) -> str:
        """What the coordinator observes: quarantined, offline after missed beats, else what the worker said."""
        if store.quarantine_of(row["worker_id"]):
            return "quarantined"
        last_seen = row["last_heartbeat_at"] or row["last_registered_at"]
        return "offline" if ledger.is_offline(last_seen, now, row["heartbeat_interval"]) else row["state"]

    def view(row, now: float) -> WorkerView:
        return WorkerView(
            worker_id=row["worker_id"],
            peer_id=row["peer_id"],
            wallet_address=row["wallet_address"],
            model_name=row["model_name"],
            blocks=None if row["block_start"] is None else [row["block_start"], row["block_end"]],
            total_blocks=total_blocks_of(row),
            state=live_state(row, now),
            location=row["location"],
            version=row["farworker_version"],
            announce_maddrs=json.loads(row["announce_maddrs"]),
            hardware=json.loads(row["hardware"]),
            registered_at=row["registered_at"],
            last_heartbeat_at=row["last_heartbeat_at"],
            heartbeat_count=row["heartbeat_count"],
            last_heartbeat=json.loads(row["last_heartbeat"]) if row["last_heartbeat"] else None,
            host_id=row["host_id"],
            instance=row["instance"],
            **figures(row, now),
        )

    @app.post(
        "/v1/workers/register",
        response_model=RegisterResponse,
        tags=["workers"],
        responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    def register(body: RegisterRequest, peer_id: str = Depends(registration_signature)) -> RegisterResponse:
        if body.peer_id != peer_id:
            raise ApiError(
                403, "peer_id in the body differs from the signing peer id", "forbidden", "peer_id"
            )
        served = sorted(settings.model_blocks)
        # The DHT prefix is what clients find blocks by: a local checkpoint directory of the same model (same
        # prefix) serves this mesh; spot checks verify its weights. Anything else would be paid for blocks
        # nobody routes to.
        if served and dht_prefix_for(body.model_name) not in {dht_prefix_for(m) for m in served}:
            raise ApiError(
                400,
                f"model_name {body.model_name!r} is not served by this mesh; it serves {', '.join(served)}",
                "unknown_model",
                "model_name",
            )
        worker_id = store.register(body.model_dump(), time.time(), settings.heartbeat_interval_s)
        span = f"{body.blocks[0]}:{body.blocks[1]}" if body.blocks else "not chosen yet"
        log.info("registered %s (peer %s) blocks %s of %s", worker_id, peer_id, span, body.model_name)
        return RegisterResponse(worker_id=worker_id, heartbeat_interval=settings.heartbeat_interval_s)

    @app.post(
        "/v1/workers/{worker_id}/heartbeat",
        response_model=HeartbeatResponse,
        tags=["workers"],
        responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    def heartbeat(
        worker_id: str, body: HeartbeatRequest, _: str = Depends(worker_signature)
    ) -> HeartbeatResponse:
        now = time.time()
        store.heartbeat(worker_id, body.model_dump(), now)
        f = figures(store.worker_row(worker_id), now)
        return HeartbeatResponse(
            earn_rate_far_per_hour=f["earn_rate_far_per_hour"],
            reliability=f["reliability"],
            uptime_pct=f["uptime_pct"],
            heartbeat_interval=settings.heartbeat_interval_s,
            quarantined=f["quarantined"],
            unreachable=f["reachability_problem"],
        )

    @app.post(
        "/v1/workers/{worker_id}/usage",
        response_model=UsageResponse,
        tags=["workers"],
        responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    def usage(worker_id: str, body: UsageRequest, _: str = Depends(worker_signature)) -> UsageResponse:
        now = time.time()
        row = store.worker_row(worker_id)
        total = total_blocks_of(row)
        for i, record in enumerate(body.records):
            if total and record.blocks[1] > total:
                raise ApiError(422, f"records.{i}.blocks {record.blocks} lies outside the model's {total} blocks",
                               "invalid_payload", f"records.{i}.blocks")
        accepted = store.add_usage(
            worker_id,
            [r.model_dump() for r in body.records],
            now,
            share_of=lambda start, end: ledger.block_share(start, end, total or end),
            reliability=uptime(row, now),
            far_per_token=settings.far_per_token,
        )
        t = store.ledger_totals(worker_id, now)
        if ledger.over_claimed(t["claimed_tokens"], t["attested_tokens"] + t["vouched_tokens"]):
            log.warning("worker %s claims %d tokens, %d attested, %d vouched: the rest is paid at the unvouched "
                        "rate %g", worker_id, t["claimed_tokens"], t["attested_tokens"], t["vouched_tokens"],
                        settings.pay_unvouched_rate)
        return UsageResponse(accepted=accepted)

    @app.post(
        "/v1/receipts",
        response_model=ReceiptsResponse,
        tags=["ledger"],
        responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    def receipts(body: ReceiptsRequest) -> ReceiptsResponse:
        """Direct clients vouch for the server sessions workers ran for them (farworker/receipts.py). Each
        receipt must come from a registered client key and verify; the batch is refused whole, naming the first
        bad receipt, and nothing is stored. A receipt counts once, and only for the peer it names."""
        from farworker.receipts import public_key_from_b64, verifies

        checked = []
        for i, receipt in enumerate(body.receipts):
            r = receipt.model_dump()
            registered = settings.client_keys.get(r["client_key_id"])
            if registered is None:
                raise ApiError(403, f"receipts.{i}.client_key_id {r['client_key_id']} is not a client key registered "
                               "with this coordinator (--client-keys)", "unregistered_client",
                               f"receipts.{i}.client_key_id")
            if not verifies(r, public_key_from_b64(registered[1])):
                raise ApiError(401, f"receipts.{i}.signature does not verify with client key {registered[0]!r}: the "
                               "receipt was changed after signing, or signed by another key", "bad_signature",
                               f"receipts.{i}.signature")
            total = settings.model_blocks.get(r["model"])
            if settings.model_blocks and total is None:
                raise ApiError(400, f"receipts.{i}.model {r['model']!r} is not served by this mesh; it serves "
                               f"{', '.join(sorted(settings.model_blocks))}", "unknown_model", f"receipts.{i}.model")
            if total and r["blocks"][1] > total:
                raise ApiError(422, f"receipts.{i}.blocks {r['blocks']} lies outside the model's {total} blocks",
                               "invalid_payload", f"receipts.{i}.blocks")
            checked.append(r)
        accepted, duplicates = store.add_receipts(checked, time.time())
        return ReceiptsResponse(accepted=accepted, duplicates=duplicates)

    @app.post(
        "/v1/workers/{worker_id}/deregister",
        response_model=DeregisterResponse,
        tags=["workers"],
        responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    def deregister(
        worker_id: str, body: DeregisterRequest | None = None, _: str = Depends(worker_signature)
    ) -> DeregisterResponse:
        store.set_state(worker_id, "offline")
        log.info("deregistered %s (%s)", worker_id, body.reason if body else "shutdown")
        return DeregisterResponse(worker_id=worker_id, state="offline")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text: the routed spot checks' outcomes (farworker_coordinator_routed_checks_total)."""
        return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/workers", response_model=WorkerList, tags=["ledger"])
    def list_workers() -> WorkerList:
        now = time.time()
        return WorkerList(workers=[view(store.worker_row(w), now) for w in store.worker_ids()])

    @app.get("/v1/hosts", response_model=HostList, tags=["ledger"])
    def list_hosts() -> HostList:
        """The workers grouped by the host they registered from (one worker per GPU): earnings per host."""
        now = time.time()
        return HostList(hosts=group_by_host([view(store.worker_row(w), now) for w in store.worker_ids()]))

    @app.get(
        "/v1/workers/{worker_id}",
        response_model=WorkerView,
        tags=["ledger"],
        responses={404: {"model": ErrorResponse}},
    )
    def get_worker(worker_id: str) -> WorkerView:
        row = store.worker_row(worker_id)
        if row is None:
            raise ApiError(404, f"unknown worker {worker_id}", "unknown_worker")
        return view(row, time.time())

    admission = Admission(settings.max_active_generations, settings.max_queued_generations)
    started = int(time.time())

    def served_model(requested: str | None) -> str:
        if mesh is None:
            raise ApiError(503, "this coordinator has no model configured for completions (--model-path)", "no_model")
        if requested and requested != settings.model_name:
            raise ApiError(400, f"model {requested!r} is not served here; this mesh serves {settings.model_name!r}",
                           "unknown_model", "model")
        return settings.model_name

    def caller(request: Request) -> str | None:
        """The name of the API key the request carries (Authorization: Bearer KEY); None when no keys are set."""
        if not settings.api_keys:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        for key, name in settings.api_keys.items():
            if token and hmac.compare_digest(token.encode(), key.encode()):
                return name
        raise ApiError(401, "this mesh needs an API key: send Authorization: Bearer <key>", "invalid_api_key")

    def generation(body, prompt_ids_of, completion_id: str, key_name: str | None = None):
        """A run(on_token, cancelled) -> Generation for the request, which records the route (attested) and
        frees its admission slot however it ends."""
        from farworker.coordinator.mesh import MeshError

        def run(on_token=None, cancelled=None):
            try:
                result = mesh.generate(prompt_ids_of(), body.max_tokens, body.temperature, top_p=body.top_p,
                                       seed=body.seed, stop=body.stop_strings(), on_token=on_token,
                                       cancelled=cancelled)
            except MeshError as err:
                raise ApiError(err.status, str(err), err.code, err.field) from None
            finally:
                admission.leave()
            route = [dict(span, worker_id=store.worker_by_peer(span["peer_id"])) for span in result.route]
            store.record_completion(completion_id, time.time(), settings.model_name, len(result.prompt_ids),
                                    len(result.completion_ids), route, key_name)
            result.route, result.id = route, completion_id
            return result

        return run

    def admit() -> None:
        try:
            admission.enter()
        except Busy as busy:
            raise ApiError(429, f"the mesh is at its limit of concurrent generations ({busy}); retry shortly",
                           "rate_limited") from None

    def usage_of(result) -> dict:
        prompt, completion = len(result.prompt_ids), len(result.completion_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream_response(run, spec: StreamSpec, stop: tuple[str, ...]) -> StreamingResponse:
        def error_chunk(err: Exception) -> dict:
            if isinstance(err, ApiError):
                return openai_error(err.status, err.message, err.code, err.field)
            return openai_error(503, f"the mesh could not serve the request: {err}", "mesh_unavailable", None)

        return StreamingResponse(sse_stream(run, spec, error_chunk, mesh.decode, stop), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/usage", response_model=KeyUsageList, tags=["ledger"])
    def key_usage() -> KeyUsageList:
        """Completions and tokens per API key (empty while the API is open)."""
        return KeyUsageList(keys=store.key_usage())

    @app.get("/v1/models", response_model=ModelList, tags=["inference"])
    def list_models(request: Request) -> ModelList:
        caller(request)
        names = [settings.model_name] if mesh is not None else []
        return ModelList(data=[ModelCard(id=name, created=started) for name in names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["inference"],
             responses={404: {"model": ErrorResponse}})
    def get_model(model_id: str, request: Request) -> ModelCard:
        caller(request)
        if mesh is None or model_id != settings.model_name:
            raise ApiError(404, f"model {model_id!r} is not served here", "unknown_model", "model")
        return ModelCard(id=model_id, created=started)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        tags=["inference"],
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                   503: {"model": ErrorResponse}},
    )
    def completions(body: CompletionRequest, request: Request):
        key_name = caller(request)
        model = served_model(body.model)
        run_id = f"cmpl-{uuid.uuid4().hex}"
        run = generation(body, lambda: body.prompt, run_id, key_name)
        admit()
        if body.stream:
            def chunk(text: str, token_ids: list[int], finish: str | None) -> dict:
                return {"id": run_id, "object": "text_completion", "created": now_s(), "model": model,
                        "choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish}]}

            def last(result) -> dict:
                return {**chunk("", [], result.finish_reason), "usage": usage_of(result), "route": result.route}

            spec = StreamSpec(lambda: None, lambda text, token: chunk(text, [token] if token >= 0 else [], None), last)
            return stream_response(run, spec, body.stop_strings())
        result = run()
        return CompletionResponse(
            id=result.id,
            created=now_s(),
            model=model,
            choices=[{"index": 0, "text": result.text, "token_ids": result.completion_ids,
                      "finish_reason": result.finish_reason}],
            usage=usage_of(result),
            route=result.route,
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        tags=["inference"],
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                   503: {"model": ErrorResponse}},
    )
    def chat_completions(body: ChatCompletionRequest, request: Request):
        from farworker.coordinator.mesh import MeshError

        key_name = caller(request)
        model = served_model(body.model)
        try:  # the template's refusals (roles out of order, no tokenizer) before any slot is taken
            prompt_ids = mesh.chat_prompt_ids([m.model_dump() for m in body.messages])
        except MeshError as err:
            raise ApiError(err.status, str(err), err.code, err.field) from None
        run_id = f"chatcmpl-{uuid.uuid4().hex}"
        run = generation(body, lambda: prompt_ids, run_id, key_name)
        admit()

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": run_id, "object": "chat.completion.chunk", "created": now_s(), "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            def last(result) -> dict:
                return {**chunk({}, result.finish_reason), "usage": usage_of(result), "route": result.route}

            spec = StreamSpec(lambda: chunk({"role": "assistant", "content": ""}, None),
                              lambda text, _token: chunk({"content": text}, None), last)
            return stream_response(run, spec, body.stop_strings())
        result = run()
        return ChatCompletionResponse(
            id=result.id,
            created=now_s(),
            model=model,
            choices=[{"index": 0, "message": {"role": "assistant", "content": result.text or ""},
                      "finish_reason": result.finish_reason}],
            usage=usage_of(result),
            route=result.route,
        )

    _document_signatures(app)
    return app


def _document_signatures(app: FastAPI) -> None:
    """Put the signature headers into the OpenAPI document as security schemes of the worker operations
    (checked in code, not declared as parameters, so a missing header is a 401, not a 422)."""
    from farworker.identity import SIGNATURE_HEADERS

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = plain_openapi()
        schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
        for header in SIGNATURE_HEADERS:
            schemes[header] = {"type": "apiKey", "in": "header", "name": header}
        for path, operations in document["paths"].items():
            if path.startswith("/v1/workers") and "post" in operations:
                operations["post"]["security"] = [{header: [] for header in SIGNATURE_HEADERS}]
        app.openapi_schema = document
        return document

    app.openapi = openapi
