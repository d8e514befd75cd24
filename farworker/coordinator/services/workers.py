"""The workers' side of the ledger: registration rules, heartbeats and usage credited, and the worker view
(claimed, attested, paid, uptime, live state) that GET /v1/workers and the heartbeat answers show."""

from __future__ import annotations

import json
import logging
import time

from farworker.catalog import dht_prefix_for
from farworker.coordinator.errors import ApiError
from farworker.coordinator.schemas.ledger import WorkerView
from farworker.coordinator.services import ledger, paging, probe_order, reachability, uptime

log = logging.getLogger("farworker.coordinator")

NO_ROUTED_CHECKS = {"routed_checks": 0, "routed_checks_failed": 0}
NO_SESSION_AUDITS = {"sessions_audited": 0, "sessions_audit_failed": 0}


class Workers:
    """The ledger's rules over one store, with the coordinator's settings. ``routed_checks`` (the runtime's
    RoutedChecks, or None) adds its in-memory counts to the view."""

    def __init__(self, store, settings, routed_checks=None):
        self.store, self.settings, self.routed_checks = store, settings, routed_checks
        self.session_audits = None  # the runtime's SessionAudits: their in-memory counts in the view

    @property
    def watches_dht(self) -> bool:
        """Uptime is what the coordinator observed: with a mesh view, a beat counts only in an interval where the
        DHT also showed the worker's span ONLINE (coordinator/dht_watch.py)."""
        return self.settings.watches_dht

    # -- registration, beats, usage ----------------------------------------------------------------------
    def check_model(self, model_name: str) -> None:
        """The DHT prefix is what clients find blocks by: a local checkpoint directory of the same model (same
        prefix) serves this mesh; spot checks verify its weights. Anything else would be paid for blocks nobody
        routes to. A coordinator that names no model takes any."""
        served = self.settings.served_models()
        if served and dht_prefix_for(model_name) not in {dht_prefix_for(m) for m in served}:
            raise ApiError(400, f"model_name {model_name!r} is not served by this mesh; it serves {', '.join(served)}",
                           "unknown_model", "model_name")

    def register(self, registration: dict, now: float) -> str:
        self.check_model(registration["model_name"])
        return self.store.register(registration, now, self.settings.heartbeat_interval_s)

    def add_usage(self, worker_id: str, records: list[dict], now: float) -> list[str]:
        """Credit new records once, at the worker's uptime now; a record outside the model's blocks refuses the
        batch, naming it."""
        row = self.store.worker_row(worker_id)
        total = self.total_blocks_of(row)
        for i, record in enumerate(records):
            if total and record["blocks"][1] > total:
                raise ApiError(422, f"records.{i}.blocks {record['blocks']} lies outside the model's {total} blocks",
                               "invalid_payload", f"records.{i}.blocks")
        # Without a known model size a record's share is 1 of what it claims (its own end).
        accepted = self.store.add_usage(worker_id, records, now,
                                        share_of=lambda start, end: ledger.block_share(start, end, total or end),
                                        reliability=self.uptime(row, now), far_per_token=self.settings.far_per_token)
        t = self.totals(worker_id, now, now)
        attested_tokens, _ = ledger.attested(t)
        if ledger.over_claimed(t["claimed_tokens"], attested_tokens + t["vouched_tokens"]):
            log.warning("worker %s claims %d tokens, %d attested, %d vouched: the rest is paid at the unvouched "
                        "rate %g", worker_id, t["claimed_tokens"], attested_tokens, t["vouched_tokens"],
                        self.settings.pay_unvouched_rate)
        return accepted

    # -- the view ------------------------------------------------------------------------------------------
    def total_blocks_of(self, row) -> int | None:
        """None while neither the coordinator nor the worker knows the model's size and the worker has
        not reported its span yet (it registered before loading)."""
        return self.settings.model_blocks.get(row["model_name"]) or row["total_blocks"] or row["block_end"]

    def totals(self, worker_id: str, since: float, now: float) -> dict:
        """The store's totals, cut at the worker's quarantine: nothing received after it pays. Claims are settled
        by ``now`` as services/ledger.settled_until says."""
        quarantine = self.store.quarantine_of(worker_id)
        paid_until = quarantine["since"] if quarantine else float("inf")
        settled_until = ledger.settled_until(now, self.settings.settle_after_s,
                                             quarantine["since"] if quarantine else None)
        return {**self.store.ledger_totals(worker_id, since, paid_until, settled_until), "quarantine": quarantine}

    def observed_uptime(self, row, now: float) -> uptime.ObservedUptime:
        return uptime.observe(self.store, row, self.watches_dht, now)

    def uptime(self, row, now: float) -> float:
        """The reliability a claim arriving now is credited at (before any over-claim scaling)."""
        return self.observed_uptime(row, now).fraction

    def live_state(self, row, now: float) -> str:
        return uptime.live_state(row, self.store.quarantine_of(row["worker_id"]) is not None, now)

    def figures(self, row, now: float) -> dict:
        """Claimed, attested, paid and settled (services/ledger.figures), uptime, probes, routed checks,
        reachability."""
        window = ledger.earn_rate_window(row["registered_at"], now, row["heartbeat_interval"])
        totals = self.totals(row["worker_id"], now - window, now)
        checks = self.routed_checks.view(row["worker_id"]) if self.routed_checks is not None else NO_ROUTED_CHECKS
        audits = self.session_audits.view(row["worker_id"]) if self.session_audits is not None else NO_SESSION_AUDITS
        observed = self.observed_uptime(row, now)
        return {
            **ledger.figures(totals, observed.fraction, window, self.settings.pay_unvouched_rate),
            "up_intervals": observed.up,
            "uptime_intervals": observed.basis,
            "uptime_new": observed.new,
            "uptime_basis": "beats_and_dht" if self.watches_dht else "beats",
            **self.store.probe_summary(row["worker_id"]),
            **checks,
            **audits,
            **reachability.view(row["reachability"]),
            **probe_order.view(self.store.probe_stats(row["worker_id"]).get(row["worker_id"])),
        }

    def view(self, row, now: float) -> WorkerView:
        return WorkerView(
            worker_id=row["worker_id"],
            peer_id=row["peer_id"],
            wallet_address=row["wallet_address"],
            model_name=row["model_name"],
            blocks=None if row["block_start"] is None else [row["block_start"], row["block_end"]],
            total_blocks=self.total_blocks_of(row),
            state=self.live_state(row, now),
            location=row["location"],
            version=row["farworker_version"],
            announce_maddrs=json.loads(row["announce_maddrs"]),
            hardware=json.loads(row["hardware"]),
            registered_at=row["registered_at"],
            last_heartbeat_at=row["last_heartbeat_at"],
            heartbeat_count=row["heartbeat_count"],
            last_heartbeat=json.loads(row["last_heartbeat"]) if row["last_heartbeat"] else None,
            announced_throughput=row["announced_throughput"],
            host_id=row["host_id"],
            instance=row["instance"],
            **self.figures(row, now),
        )

    def rows(self) -> list:
        return self.store.worker_rows()

    def views(self, now: float | None = None) -> list[WorkerView]:
        now = time.time() if now is None else now
        return [self.view(row, now) for row in self.rows()]

    def page(self, limit: int, cursor: str | None) -> tuple[list[WorkerView], str | None]:
        """One page of the views in registration order (services/paging.py), and the cursor of the next page
        (None after the last)."""
        rows = self.store.worker_rows_page(paging.after(cursor), limit + 1)
        more, rows = len(rows) > limit, rows[:limit]
        now = time.time()
        last = rows[-1] if rows else None
        return ([self.view(row, now) for row in rows],
                paging.cursor_of(last["registered_at"], last["worker_id"]) if more and last else None)

    def hosts_page(self, limit: int, cursor: str | None) -> tuple[list[WorkerView], str | None]:
        """The views of the workers of one page of hosts (host id order, the group without one last), and the
        cursor of the next page."""
        keys = self.store.host_keys_page(paging.after_host(cursor), limit + 1)
        more, keys = len(keys) > limit, keys[:limit]
        rows = self.store.worker_rows_of_hosts([host for none, host in keys if not none], any(n for n, _ in keys))
        now = time.time()
        return [self.view(row, now) for row in rows], paging.cursor_of(*keys[-1]) if more and keys else None

    # -- who the runtime's loops look at ---------------------------------------------------------------------
    def to_probe(self) -> list:
        """Online workers with a known span that are due for a probe, in the order the round probes them
        (services/probe_order.py: workers that serve first, unreachable ones rarely)."""
        now = time.time()
        online = [r for r in self.rows() if r["block_start"] is not None and self.live_state(r, now) == "online"]
        return probe_order.order(online, self.store.proven_worker_ids(), self.store.probe_stats(), now,
                                 self.settings.probe_period_s)

    def to_watch(self) -> list:
        """Workers of the served model that may be serving (the DHT watch's look)."""
        now = time.time()
        return [r for r in self.rows() if r["model_name"] == self.settings.model_name
                and self.live_state(r, now) not in ("offline", "quarantined")]
