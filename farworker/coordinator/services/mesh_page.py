"""The mesh page's view models (GET / and /workers/{id}): block coverage, workers, hosts, last routes, one worker's
beats and checks. Plain dicts for the templates, built from the ledger's own views (Workers.view, group_by_host):
no figure is computed twice, and nothing secret (API keys, prompts, hidden wallets) is put in."""

from __future__ import annotations

import time

from farworker.coordinator.schemas.ledger import WorkerView
from farworker.coordinator.services.coverage import holders_per_block, models_and_blocks, serving
from farworker.coordinator.services.hosts import group_by_host

LAST_ROUTES = 10  # completions shown in "last routes"
WORKER_BEATS = 30  # beats shown on a worker's page, newest first
WORKER_PROBES = 30  # probes (and failed routed checks and audits) shown on a worker's page


def short_wallet(address: str) -> str:
    """0x1234…abcd: enough to tell one's own wallet from another, not the address."""
    return f"{address[:6]}…{address[-4:]}" if len(address) > 12 else "…"


def coverage(workers: list[WorkerView], total_blocks: int | None) -> list[dict]:
    """Per block of the served model: how many serving workers hold it (0 is a gap: no route through the model)."""
    if not total_blocks:
        return []
    return [{"block": block, "holders": n} for block, n in enumerate(holders_per_block(workers, total_blocks))]


def worker_row(worker: WorkerView, hide_wallets: bool) -> dict:
    """What the page shows of one worker (the ledger's figures as they are; the wallet shortened if hidden)."""
    beat = worker.last_heartbeat or {}
    return {
        "worker_id": worker.worker_id,
        "peer_id": worker.peer_id,
        "location": worker.location,
        "wallet": short_wallet(worker.wallet_address) if hide_wallets else worker.wallet_address,
        "state": worker.state,
        "phase": beat.get("phase"),
        "health_reason": beat.get("health_reason") if beat.get("healthy") is False else None,
        "blocks": worker.blocks,
        "host_id": worker.host_id,
        "instance": worker.instance,
        "tokens_served": worker.tokens_served,
        "throughput": worker.announced_throughput,
        "tokens_attested": worker.tokens_attested,
        "uptime_pct": worker.uptime_pct,
        "up_intervals": worker.up_intervals,
        "uptime_basis": worker.uptime_basis,
        "reliability": worker.reliability,
        "settled_far": worker.settled_far,
        "pending_far": worker.pending_far,
        "forfeited_far": worker.forfeited_far,
        "earn_rate_far_per_hour": worker.earn_rate_far_per_hour,
        "quarantined": worker.quarantined,
        "probes": worker.probes,
        "probes_passed": worker.probes_passed,
        "routed_checks": worker.routed_checks,
        "routed_checks_failed": worker.routed_checks_failed,
        "sessions_audited": worker.sessions_audited,
        "sessions_audit_failed": worker.sessions_audit_failed,
        "last_heartbeat_at": worker.last_heartbeat_at,
        "gpus": len(beat.get("gpus") or []),
    }


def mesh_view(workers, now: float | None = None) -> dict:
    """Everything GET / shows. ``workers`` is the coordinator's services.workers.Workers."""
    now = time.time() if now is None else now
    settings = workers.settings
    views = workers.views(now)
    model = settings.model_name
    sizes = models_and_blocks(views, settings.model_blocks, [model] if model else [])
    total = sizes.get(model) if model else max(sizes.values(), default=0)  # no model served: its workers' largest
    served = [w for w in views if model is None or w.model_name == model]
    names = {w.worker_id: w.location for w in views}
    routes = []
    for completion in workers.store.latest_completions(LAST_ROUTES):
        routes.append({
            "id": completion["id"],
            "created_at": completion["created_at"],
            "model": completion["model"],
            "tokens": completion["prompt_tokens"] + completion["completion_tokens"],
            "spans": [{"worker_id": s["worker_id"], "location": names.get(s["worker_id"]),
                       "peer_id": s["peer_id"], "blocks": [s["block_start"], s["block_end"]], "tokens": s["tokens"]}
                      for s in completion["route"]],
        })
    hosts = [h for h in group_by_host(views) if h.host_id is not None and len(h.worker_ids) > 1]
    cells = coverage(served, total)
    return {
        "now": now,
        "model": model,
        "total_blocks": total,
        "coverage": cells,
        "gaps": sum(cell["holders"] == 0 for cell in cells),
        "workers": [worker_row(w, settings.hide_wallets) for w in sorted(
            views, key=lambda w: (w.blocks is None, (w.blocks or [0])[0], w.worker_id))],
        "online": sum(serving(w) for w in views),
        "hosts": [{**h.model_dump(exclude={"wallet_addresses"}),
                   "wallets": [short_wallet(a) if settings.hide_wallets else a for a in h.wallet_addresses]}
                  for h in hosts],
        "routes": routes,
        "heartbeat_interval_s": settings.heartbeat_interval_s,
    }


def worker_view(workers, worker_id: str, now: float | None = None) -> dict | None:
    """Everything GET /workers/{id} shows; None for an unknown worker."""
    now = time.time() if now is None else now
    row = workers.store.worker_row(worker_id)
    if row is None:
        return None
    worker = workers.view(row, now)
    beats = workers.store.heartbeats(worker_id)[-WORKER_BEATS:][::-1]
    probes = workers.store.probes(worker_id, WORKER_PROBES)
    routed = workers.routed_checks.recent(worker_id) if workers.routed_checks is not None else []
    for check in (*probes, *routed):
        check["ratio"] = None if check["error"] is None else check["error"] / check["tolerance"]
    return {
        "now": now,
        "worker": worker_row(worker, workers.settings.hide_wallets),
        "beats": [{"received_at": b["received_at"], "state": b.get("state"), "blocks": b.get("blocks"),
                   "healthy": b.get("healthy", True), "phase": b.get("phase"), "health_reason": b.get("health_reason"),
                   "counters": b.get("counters") or {}} for b in beats],
        "probes": probes,
        "routed_checks": routed,
        "heartbeat_interval_s": workers.settings.heartbeat_interval_s,
    }
