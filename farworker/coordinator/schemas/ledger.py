"""The ledger's views (workers, hosts, API keys' usage) and the receipts route's body and answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from farworker.wire_records import Receipt, StrictRecord


class ReceiptsRequest(StrictRecord):
    receipts: list[Receipt] = Field(min_length=1, max_length=1000)


class ReceiptsResponse(BaseModel):
    accepted: list[str] = Field(description="receipt ids now on the ledger (new ones and ones already counted)")
    duplicates: list[str] = Field(
        description="receipt ids not counted: another receipt already vouches for the same server session"
    )


class WorkerView(BaseModel):
    worker_id: str
    peer_id: str
    wallet_address: str
    model_name: str
    blocks: list[int] | None = Field(description="[start, end); null until the worker reports its span")
    total_blocks: int | None
    state: str
    location: str
    version: str
    announce_maddrs: list[str]
    hardware: dict
    registered_at: float
    last_heartbeat_at: float | None
    heartbeat_count: int
    announced_throughput: float | None = Field(
        default=None,
        description="the throughput the worker announces to clients in the DHT with its ONLINE span (petals' figure, "
        "which clients' routing weighs servers by), as the coordinator last saw it; null until seen there",
    )
    last_heartbeat: dict | None = Field(
        description="the last heartbeat as sent: state, blocks, uptime, gpus, counters"
    )
    tokens_served: int = Field(description="tokens the worker's usage records claim")
    tokens_attested: int = Field(description="tokens the coordinator's own completions saw it serve")
    unattested_tokens: int = Field(description="claimed and not attested by the coordinator's own completions")
    tokens_vouched: int = Field(description="tokens direct clients' signed receipts say it served")
    unvouched_tokens: int = Field(
        description="claimed and neither attested nor vouched (direct traffic without receipts): paid at the "
        "coordinator's --pay-unvouched-rate, 0 by default"
    )
    claimed_far: float = Field(description="what its claims would earn if they were all attested")
    earnings_far: float = Field(description="paid: the claims' earnings scaled to the attested + vouched share, "
                                "as settled_far + pending_far + forfeited_far (the worker keeps the first two)")
    settled_far: float = Field(description="of earnings_far, the claims accepted --settle-after seconds ago or "
                               "more (before a quarantine): the worker's to keep")
    pending_far: float = Field(description="of earnings_far, the newer claims: settle once --settle-after seconds "
                               "old, unless a quarantine forfeits them first")
    forfeited_far: float = Field(description="of earnings_far, what was still pending when the worker was "
                                 "quarantined: never paid")
    reliability: float = Field(description="observed uptime, scaled down by the attested share on an over-claim")
    uptime_pct: float = Field(description="100 x up_intervals / uptime_intervals (100 while there are none); "
                              "provisional while uptime_new")
    uptime_intervals: int = Field(default=0, description="the heartbeat intervals uptime is judged over: each "
                                  "completed one since the worker was first up, and the current one once it is up")
    uptime_new: bool = Field(default=False, description="true until the worker has been seen up and judged over 5 "
                             "intervals: its uptime and reliability read \"new\" (provisional), not a measure of "
                             "flakiness; a worker never seen up stays new, at 0 % once 5 intervals have passed")
    up_intervals: int = Field(description="heartbeat intervals after the registration's counted as up: a healthy "
                              "beat in it and, with uptime_basis beats_and_dht, its whole span seen ONLINE in the "
                              "DHT in it; none from a quarantine on")
    uptime_basis: Literal["beats", "beats_and_dht"] = Field(
        description="beats_and_dht: the coordinator watches the mesh DHT; beats: it has no mesh view (no model or "
        "initial peers), so a healthy beat alone counts")
    earn_rate_far_per_hour: float
    quarantined: str | None = Field(description="why it failed a spot check; null while in good standing")
    probes: int = Field(description="spot checks sent to it")
    probes_passed: int
    last_probe_at: float | None
    last_probe_problem: str | None = Field(description="the last probe's failure: a wrong answer or no answer")
    routed_checks: int = Field(description="its routed completions' first steps recomputed by the coordinator "
                               "(a sampled share, --sample-routed), since the coordinator started")
    routed_checks_failed: int = Field(description="of those, how many differed from the reference (a failure "
                                      "quarantines the worker)")
    sessions_audited: int = Field(default=0, description="its server sessions recomputed at every position by the "
                                  "coordinator (a sampled share, --audit-share), since the coordinator started")
    sessions_audit_failed: int = Field(default=0, description="of those, how many differed from the reference at "
                                       "some position (a failure quarantines the worker)")
    reachable: bool | None = Field(default=None, description="whether the coordinator's last direct dial (no relay) "
                                   "of its announced addresses connected; null: not dialled yet")
    reachability_checked_at: float | None = None
    reachability_problem: str | None = Field(default=None, description="the addresses dialled and why each failed, "
                                             "when none connected")
    unanswered_probes: int = Field(default=0, description="the last probes in a row the worker did not answer at "
                                   "all (a wrong answer is an answer)")
    probe_unreachable: bool = Field(default=False, description="3 or more unanswered in a row: probed rarely (after "
                                    "2, 4 .. 16 probe periods) until it answers again; not quarantined")
    host_id: str | None = Field(default=None, description="the host it registered from (see GET /v1/hosts)")
    instance: int | None = Field(default=None, description="its index on that host (one worker per GPU)")


NEXT_CURSOR = Field(default=None, description="pass as `cursor` for the next page; null after the last page")


class WorkerList(BaseModel):
    workers: list[WorkerView] = Field(description="in registration order, then worker id")
    next_cursor: str | None = NEXT_CURSOR


class HostView(BaseModel):
    host_id: str | None = Field(description="as the workers registered it; null groups workers that sent none")
    wallet_addresses: list[str] = Field(description="the payout wallets of the host's workers")
    worker_ids: list[str] = Field(description="one worker per GPU, by instance index")
    workers_online: int = Field(description="of them, online now (as GET /v1/workers says)")
    tokens_served: int = Field(description="the sum of the workers' tokens_served")
    tokens_attested: int
    claimed_far: float
    earnings_far: float = Field(description="the sum of the workers' earnings_far: what the host was paid, "
                                "settled, pending or forfeited")
    settled_far: float = Field(description="the sum of the workers' settled_far")
    pending_far: float = Field(description="the sum of the workers' pending_far")
    forfeited_far: float = Field(description="the sum of the workers' forfeited_far")
    earn_rate_far_per_hour: float


class HostList(BaseModel):
    hosts: list[HostView] = Field(description="in host id order; the group without host id last")
    next_cursor: str | None = NEXT_CURSOR


class KeyUsage(BaseModel):
    key_name: str
    completions: int
    prompt_tokens: int
    completion_tokens: int


class KeyUsageList(BaseModel):
    keys: list[KeyUsage]
