"""The coordinator's own series for GET /metrics: its ledger per worker (state, observed uptime, reliability,
earnings) and block coverage, read at scrape time from the ledger's views (services/workers.Workers), so a
dashboard or an alert shows the numbers GET /v1/workers shows. Names and the alerts on them: monitoring/."""

from __future__ import annotations

import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from farworker.coordinator.services import coverage

STATES = ("joining", "online", "draining", "offline", "quarantined")


class CoordinatorCollector:
    def __init__(self, workers):
        self.workers = workers  # services/workers.Workers

    def collect(self):
        views = self.workers.views(time.time())
        info = GaugeMetricFamily("farworker_coordinator_worker_info", "A registered worker (always 1).",
                                 labels=["worker_id", "peer_id", "model", "host_id", "instance"])
        counts = GaugeMetricFamily("farworker_coordinator_workers", "Registered workers by observed state.",
                                   labels=["state"])
        per_worker = {
            name: GaugeMetricFamily(f"farworker_coordinator_worker_{name}", help_text, labels=["worker_id"])
            for name, help_text in (
                ("serving", "1 while the worker holds its span for clients: online as observed and healthy."),
                ("quarantined", "1 once the worker failed a check: paid and routed nothing since."),
                ("uptime_ratio", "Observed uptime (0-1): up slots over the slots judged (docs/trust.md)."),
                ("uptime_new", "1 while too little is observed to judge uptime: the ratio is provisional."),
                ("reliability", "Reliability its claims are credited at (0-1)."),
                ("last_heartbeat_timestamp_seconds", "Unix time of the worker's last heartbeat (or registration)."),
                ("earn_rate_far_per_hour", "Paid $FAR per hour over the last hour."),
            )
        }
        state = GaugeMetricFamily("farworker_coordinator_worker_state", "1 for the worker's observed state.",
                                  labels=["worker_id", "state"])
        earnings = GaugeMetricFamily("farworker_coordinator_worker_earnings_far",
                                     "Paid $FAR by settlement: settled, pending or forfeited.",
                                     labels=["worker_id", "status"])
        tokens = CounterMetricFamily("farworker_coordinator_worker_tokens",
                                     "Tokens: claimed by the worker's usage records, attested by the coordinator.",
                                     labels=["worker_id", "kind"])
        by_state = dict.fromkeys(STATES, 0)
        for w in views:
            wid = [w.worker_id]
            info.add_metric([w.worker_id, w.peer_id, w.model_name, w.host_id or "", str(w.instance or 0)], 1)
            by_state[w.state] = by_state.get(w.state, 0) + 1
            state.add_metric([w.worker_id, w.state], 1)
            for name, value in (
                ("serving", coverage.serving(w)),
                ("quarantined", w.quarantined is not None),
                ("uptime_ratio", w.uptime_pct / 100),
                ("uptime_new", w.uptime_new),
                ("reliability", w.reliability),
                ("last_heartbeat_timestamp_seconds", w.last_heartbeat_at or w.registered_at),
                ("earn_rate_far_per_hour", w.earn_rate_far_per_hour),
            ):
                per_worker[name].add_metric(wid, float(value))
            for status in ("settled", "pending", "forfeited"):
                earnings.add_metric([w.worker_id, status], getattr(w, f"{status}_far"))
            tokens.add_metric([w.worker_id, "claimed"], w.tokens_served)
            tokens.add_metric([w.worker_id, "attested"], w.tokens_attested)
        for name, n in by_state.items():
            counts.add_metric([name], n)
        yield from (info, counts, state, *per_worker.values(), earnings, tokens)
        settings = self.workers.settings
        holders = GaugeMetricFamily("farworker_coordinator_block_holders",
                                    "Serving workers holding each block of a model (0: no route through it).",
                                    labels=["model", "block"])
        blocks = GaugeMetricFamily("farworker_coordinator_model_blocks", "Blocks of each model shown.",
                                   labels=["model"])
        for model, total in sorted(coverage.models_and_blocks(views, settings.model_blocks,
                                                              settings.served_models()).items()):
            blocks.add_metric([model], total)
            for block, n in enumerate(coverage.block_holders(views, model, total)):
                holders.add_metric([model, str(block)], n)
        yield blocks
        yield holders
