"""The HTTP edge shared by the routers: the body limit, error answers (ours and OpenAI's), the signature checks
of worker requests, and the signature headers in the OpenAPI document."""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from farworker.coordinator.errors import ApiError
from farworker.coordinator.schemas.openai import openai_error
from farworker.coordinator.services.registration import Refused
from farworker.identity import HEADER_PEER_ID, SIGNATURE_HEADERS, SignatureError, verify_request

BODY_KEY = "farworker.body"
REGISTER_PATH = "/v1/workers/register"
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def error(status: int, message: str, code: str, field: str | None = None, **extra) -> JSONResponse:
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
        response = error(413, f"request body over {self.limit} bytes", "body_too_large")
        await response(scope, receive, send)


class ShedRegistrations:
    """Registrations over their source's rate (services/registration.RegistrationGate.check_rate) answer 429 here,
    the outermost layer: before the body is read, the route found, the signature or the database looked at, so a
    flood costs the coordinator a dictionary lookup per request."""

    def __init__(self, app, gate):
        self.app, self.gate = app, gate

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == REGISTER_PATH and scope["method"] == "POST":
            client = scope.get("client")
            try:
                self.gate.check_rate(client[0] if client else None)
            except Refused as err:  # answered as any refusal is (api_error: Retry-After from the error)
                return await (await api_error(Request(scope), err))(scope, receive, send)
        return await self.app(scope, receive, send)


def _for_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATHS)


async def api_error(request: Request, err: ApiError) -> JSONResponse:
    retry_after = err.retry_after_s or (1 if err.status == 429 and _for_openai(request) else None)
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    if _for_openai(request):
        return JSONResponse(openai_error(err.status, err.message, err.code, err.field), err.status, headers)
    response = error(err.status, err.message, err.code, err.field)
    response.headers.update(headers or {})
    return response


async def invalid_payload(request: Request, err: RequestValidationError) -> JSONResponse:
    """One line naming the first bad field (and, outside OpenAI's routes, every bad field in ``detail``)."""
    problems = err.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid"}
    in_query = tuple(first.get("loc", ()))[:1] == ("query",)
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    name = ".".join(loc) or None
    message = f"invalid {name or 'payload'}: {first.get('msg')}"
    if in_query and not _for_openai(request):  # a bad page limit: the request is wrong, not a payload
        return error(400, message, "invalid_query", name)
    if _for_openai(request):  # OpenAI answers an invalid request with 400 and its error object
        return JSONResponse(openai_error(400, message, "invalid_payload", name), 400)
    detail = [
        {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")}
        for e in problems
    ]
    return error(422, message, "invalid_payload", name, detail=detail)


# -- signed worker requests (farworker/identity.py) -------------------------------------------------------------
def _signed_path(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _check(public_key: str, request: Request) -> str:
    settings, store = request.app.state.settings, request.app.state.store
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
    store = request.app.state.store
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


def document_signatures(app: FastAPI) -> None:
    """Put the signature headers into the OpenAPI document as security schemes of the worker operations
    (checked in code, not declared as parameters, so a missing header is a 401, not a 422)."""
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
