"""The worker routes' bodies and answers (register, heartbeat, usage, deregister) around the wire records."""

from __future__ import annotations

from pydantic import BaseModel, Field

from farworker.wire_records import StrictRecord, UsageRecord


class RegisterResponse(BaseModel):
    worker_id: str
    heartbeat_interval: float = Field(description="seconds between heartbeats the coordinator wants")


class HeartbeatResponse(BaseModel):
    earn_rate_far_per_hour: float
    reliability: float = Field(description="0..1; uptime share from heartbeats")
    uptime_pct: float
    uptime_new: bool = Field(default=False, description="true while too little is observed to judge uptime: "
                             "uptime_pct and reliability are provisional")
    heartbeat_interval: float
    quarantined: str | None = Field(
        default=None, description="why the coordinator quarantined this worker (a failed spot check): paid "
        "nothing and routed nothing from then on; null while in good standing"
    )
    settled_far: float = Field(default=0.0, description="earnings settled (--settle-after seconds old, before any "
                               "quarantine): the worker's to keep")
    pending_far: float = Field(default=0.0, description="earnings not settled yet; a quarantine forfeits them")
    forfeited_far: float = Field(default=0.0, description="earnings forfeited by a quarantine")
    unreachable: str | None = Field(
        default=None, description="'not reachable from the coordinator: tried <address> (<why>); ...' when the "
        "coordinator's last direct dial of every announced address failed (no relay), or 'not reachable from the "
        "coordinator: its last N probes got no answer; ...' when 3 or more probes in a row went unanswered; null "
        "when one answered or none was dialled yet"
    )


class UsageRequest(StrictRecord):
    records: list[UsageRecord] = Field(min_length=1, max_length=1000)


class UsageResponse(BaseModel):
    accepted: list[str] = Field(description="ids now on the ledger (new ones and ones already counted)")


class DeregisterRequest(StrictRecord):
    reason: str = Field(default="shutdown", max_length=256)


class DeregisterResponse(BaseModel):
    worker_id: str
    state: str
