"""The ledger per host: a multi-GPU host runs one worker per GPU, each registered with the host's id."""

from __future__ import annotations

from farworker.coordinator.schemas.ledger import HostView, WorkerView


def group_by_host(workers: list[WorkerView]) -> list[HostView]:
    """One HostView per host id, its figures the sums of its workers' (the per-worker rules decide what is paid;
    grouping adds nothing and drops nothing). Workers that sent no host id form one group, host_id null."""
    groups: dict[str | None, list[WorkerView]] = {}
    for worker in workers:
        groups.setdefault(worker.host_id, []).append(worker)
    hosts = []
    for host_id, members in sorted(groups.items(), key=lambda item: (item[0] is None, item[0] or "")):
        members.sort(key=lambda w: (w.instance is None, w.instance or 0, w.worker_id))
        hosts.append(HostView(
            host_id=host_id,
            wallet_addresses=sorted({w.wallet_address for w in members}),
            worker_ids=[w.worker_id for w in members],
            workers_online=sum(w.state == "online" for w in members),
            tokens_served=sum(w.tokens_served for w in members),
            tokens_attested=sum(w.tokens_attested for w in members),
            claimed_far=round(sum(w.claimed_far for w in members), 9),
            earnings_far=round(sum(w.earnings_far for w in members), 9),
            settled_far=round(sum(w.settled_far for w in members), 9),
            pending_far=round(sum(w.pending_far for w in members), 9),
            forfeited_far=round(sum(w.forfeited_far for w in members), 9),
            earn_rate_far_per_hour=round(sum(w.earn_rate_far_per_hour for w in members), 9),
        ))
    return hosts
