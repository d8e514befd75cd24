"""The records a worker and the coordinator exchange (registration, heartbeat, usage record, receipt): one
pydantic schema each, used by both sides (the worker's outbox validates its usage records with these).

Unknown top-level fields are refused (``extra="forbid"``) so a worker and a coordinator that drifted
apart fail loudly, naming the field; hardware and per-GPU telemetry entries accept extra readings
because what NVML can report differs per GPU. No FastAPI here: the worker imports this module.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BlockIndex = Annotated[int, Field(ge=0, le=100_000)]
# Cumulative counters since a worker started: integers JSON carries exactly.
Count = Annotated[int, Field(ge=0, le=2**53)]
# One usage record is a session or 10 s of one: far fewer than 10^9 tokens or steps on any GPU. The bound also
# keeps the ledger's SQLite sums (int64) from overflowing into a 500.
RecordCount = Annotated[int, Field(ge=0, le=10**9)]
# Unix seconds before 2100: a finite time, never inf or NaN.
UnixTime = Annotated[float, Field(ge=0, le=4_102_444_800, allow_inf_nan=False)]
WALLET_PATTERN = r"^0x[0-9a-fA-F]{40}$"
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{30,128}$"  # base58
HOST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _check_span(value: list[int]) -> list[int]:
    if value[0] >= value[1]:
        raise ValueError(f"blocks must be [start, end] with start < end, got {value}")
    return value


def _check_uuid(value: str) -> str:
    """A record's or receipt's id: any UUID spelling, stored in its canonical form (so one id counts once)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("id must be a UUID") from None


class StrictRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: Count
    name: str = Field(max_length=256)
    uuid: str | None = Field(default=None, max_length=128)
    memory_total_bytes: Count


class Hardware(BaseModel):
    model_config = ConfigDict(extra="allow")
    gpus: list[GpuInfo] = Field(max_length=64)
    gpu_count: Count
    driver_version: str | None = Field(default=None, max_length=64)
    cuda_version: str | None = Field(default=None, max_length=64)
    cpu: str = Field(max_length=256)
    cpu_count: Count | None = None
    ram_bytes: Count


class RegisterRequest(StrictRecord):
    wallet_address: str = Field(pattern=WALLET_PATTERN, description="payout wallet, 0x + 40 hex digits")
    peer_id: str = Field(pattern=PEER_ID_PATTERN, description="libp2p peer id (base58) of the worker's key")
    public_key: str = Field(
        min_length=64,
        max_length=4096,
        description="RSA public key, base64 DER SubjectPublicKeyInfo; the peer id derives from it",
    )
    model_name: str = Field(min_length=1, max_length=256)
    blocks: Annotated[list[BlockIndex], Field(min_length=2, max_length=2)] | None = Field(
        description="[start, end): the model blocks this worker serves; null while they are not known yet "
        "(a worker registers at start, before its weights are downloaded and petals picks its span; its "
        "heartbeats carry the span once known)"
    )
    total_blocks: int | None = Field(
        default=None, ge=1, le=100_000, description="the model's block count, as the worker sees it"
    )
    torch_dtype: str = Field(max_length=32)
    quant_type: str = Field(max_length=32)
    location: str = Field(default="Unknown", max_length=128)
    version: str = Field(max_length=64, description="farworker version")
    announce_maddrs: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=64)
    hardware: Hardware
    host_id: str | None = Field(
        default=None, pattern=HOST_ID_PATTERN,
        description="the machine this worker runs on: every worker (one per GPU) of a host sends the same, so "
        "the ledger shows a provider's earnings per host (GET /v1/hosts); null from workers before it existed",
    )
    instance: int | None = Field(
        default=None, ge=0, le=63, description="the worker's index on its host (farworker@N); null for a single worker"
    )

    @field_validator("blocks")
    @classmethod
    def _span(cls, value):
        return None if value is None else _check_span(value)


class GpuTelemetry(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: Count
    name: str | None = Field(default=None, max_length=256)
    uuid: str | None = Field(default=None, max_length=128)
    utilization_pct: float | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: Count | None = None
    memory_total_bytes: Count | None = None
    temperature_c: float | None = None
    power_w: float | None = Field(default=None, ge=0)
    sm_clock_mhz: float | None = Field(default=None, ge=0)
    mem_clock_mhz: float | None = Field(default=None, ge=0)
    ecc_volatile_uncorrected: Count | None = None
    retired_pages_dbe: Count | None = None
    # Xid errors since the worker started (counted from NVML events), the last Xid, and events per Xid
    xid_errors: Count | None = None
    xid_last: Count | None = None
    xid_by_code: dict[str, Count] | None = Field(default=None, max_length=256)


class Counters(StrictRecord):
    requests: Count
    inference_steps: Count
    tokens_processed: Count
    errors: Count


class HeartbeatRequest(StrictRecord):
    state: Literal["joining", "online", "draining"]
    blocks: Annotated[list[BlockIndex], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[start, end) served, or planned while joining; null while not known yet"
    )
    phase: str | None = Field(
        default=None,
        max_length=256,
        description="what a joining worker is doing, for operators (e.g. 'downloading weights: 1.20 of "
        "13.48 GB (9%)', 'loading blocks')",
    )
    healthy: bool = Field(
        default=True,
        description="false while the worker withholds systemd watchdog pings (runtime stalled, a handler "
        "process dead, DHT announcements stale); such beats do not count toward uptime",
    )
    health_reason: str | None = Field(default=None, max_length=256, description="why it is unhealthy")
    uptime_seconds: float = Field(ge=0, le=10**10, allow_inf_nan=False,
                                  description="seconds since the worker process started")
    gpus: list[GpuTelemetry] = Field(max_length=64, description="empty on a host without GPU")
    counters: Counters

    @field_validator("blocks")
    @classmethod
    def _span(cls, value):
        return None if value is None else _check_span(value)


class UsageRecord(StrictRecord):
    id: str = Field(description="UUID chosen by the worker; a record id counts once")
    session_id: str = Field(max_length=256, description="inference session id ('' for a lone forward pass)")
    blocks: Annotated[list[BlockIndex], Field(min_length=2, max_length=2)]
    tokens: RecordCount
    steps: RecordCount
    started_at: UnixTime = Field(description="unix seconds")
    ended_at: UnixTime = Field(description="unix seconds")

    _blocks = field_validator("blocks")(_check_span)

    _id = field_validator("id")(_check_uuid)

    @model_validator(mode="after")
    def _times(self):
        if self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")
        return self


CLIENT_KEY_ID_PATTERN = r"^[0-9a-f]{32}$"


class Receipt(StrictRecord):
    """A direct client's word that one worker served one server session of its generation: what vouches for
    direct traffic (docs/trust.md). Signed with the client's Ed25519 key over ``farworker.receipts.signed_bytes``
    (every field but ``signature``); the coordinator counts a receipt once, for the peer it names, from a key it
    has registered."""

    id: str = Field(description="UUID chosen by the client; a receipt id counts once")
    peer_id: str = Field(pattern=PEER_ID_PATTERN, description="the worker that served the session (base58 peer id)")
    blocks: Annotated[list[BlockIndex], Field(min_length=2, max_length=2)] = Field(
        description="[start, end): the span the session ran on"
    )
    tokens: RecordCount = Field(description="token positions the session processed")
    session_id: str = Field(min_length=1, max_length=256,
                            description="petals' server session id (the worker's usage records carry it too)")
    model: str = Field(min_length=1, max_length=256)
    client_key_id: str = Field(pattern=CLIENT_KEY_ID_PATTERN,
                               description="hex SHA-256 of the client's raw Ed25519 public key, first 16 bytes")
    created_at: int = Field(ge=0, le=4_102_444_800, description="integer unix seconds")
    signature: str = Field(min_length=1, max_length=128, description="base64 Ed25519 signature")

    _blocks = field_validator("blocks")(_check_span)

    _id = field_validator("id")(_check_uuid)
