"""The mesh page: HTML for people (GET /, /workers/{id}), its fragments for the page's refresh, and its own static
files. Server-rendered with jinja2 (autoescape on); the only script is web/static/page.js, and the CSP header allows
no other (no inline scripts or styles). JSON stays at /v1/..."""

from __future__ import annotations

from pathlib import Path

import jinja2
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from farworker.coordinator.errors import ApiError
from farworker.coordinator.routers import deps
from farworker.coordinator.services import mesh_page

WEB = Path(__file__).resolve().parent.parent / "web"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page runs only what it serves itself: a stored name or location with markup shows as text (autoescape), and a
# script that slipped through anyway would not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

templates = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB / "templates"), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True,
                               undefined=jinja2.StrictUndefined)

router = APIRouter(include_in_schema=False)


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    seconds = max(0.0, now - at)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


templates.filters["ago"] = _ago
templates.filters["far"] = lambda value: f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
templates.filters["span"] = lambda blocks: "—" if not blocks else f"{blocks[0]}:{blocks[1]}"


def _html(template: str, **context) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**context),
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def _refresh_ms(interval_s: float) -> int:
    """Refresh about once per heartbeat interval, between 1 and 10 s: a change shows within an interval or so."""
    return int(1000 * min(10.0, max(1.0, interval_s)))


@router.get("/", response_class=HTMLResponse)
def mesh(workers: deps.WorkersDep) -> HTMLResponse:
    view = mesh_page.mesh_view(workers)
    return _html("mesh.html", view=view, fragment="/fragments/mesh",
                 refresh_ms=_refresh_ms(view["heartbeat_interval_s"]))


@router.get("/fragments/mesh", response_class=HTMLResponse)
def mesh_fragment(workers: deps.WorkersDep) -> HTMLResponse:
    return _html("_mesh.html", view=mesh_page.mesh_view(workers))


def _worker(workers, worker_id: str) -> dict:
    view = mesh_page.worker_view(workers, worker_id)
    if view is None:
        raise ApiError(404, f"unknown worker {worker_id}", "unknown_worker")
    return view


@router.get("/workers/{worker_id}", response_class=HTMLResponse)
def worker(worker_id: str, workers: deps.WorkersDep) -> HTMLResponse:
    view = _worker(workers, worker_id)
    return _html("worker.html", view=view, fragment=f"/fragments/workers/{worker_id}",
                 refresh_ms=_refresh_ms(view["heartbeat_interval_s"]))


@router.get("/fragments/workers/{worker_id}", response_class=HTMLResponse)
def worker_fragment(worker_id: str, workers: deps.WorkersDep) -> HTMLResponse:
    return _html("_worker.html", view=_worker(workers, worker_id))


@router.get("/favicon.ico")
def favicon() -> Response:
    """Browsers ask for it whatever the page says: the page's icon, not a 404 in every console."""
    return static("icon.svg")


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The page's own files; only names listed in web/static (no paths)."""
    path = WEB / "static" / name
    if "/" in name or path.suffix not in STATIC_TYPES or not path.is_file():
        raise ApiError(404, f"no static file {name}", "not_found")
    return Response(path.read_bytes(), media_type=STATIC_TYPES[path.suffix],
                    headers={**SECURITY_HEADERS, "Cache-Control": "max-age=300"})
