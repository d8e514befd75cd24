"""The wire models of the Far Labs coordinator API (openapi/farworker-api.yaml is generated from these).

Unknown top-level fields are refused (``extra="forbid"``) so a worker and a coordinator that drifted
apart fail loudly, naming the field; hardware and per-GPU telemetry entries accept extra readings
because what NVML can report differs per GPU.
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


class _Strict(BaseModel):
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


class RegisterRequest(_Strict):
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


class RegisterResponse(BaseModel):
    worker_id: str
    heartbeat_interval: float = Field(description="seconds between heartbeats the coordinator wants")


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


class Counters(_Strict):
    requests: Count
    inference_steps: Count
    tokens_processed: Count
    errors: Count


class HeartbeatRequest(_Strict):
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


class HeartbeatResponse(BaseModel):
    earn_rate_far_per_hour: float
    reliability: float = Field(description="0..1; uptime share from heartbeats")
    uptime_pct: float
    heartbeat_interval: float
    quarantined: str | None = Field(
        default=None, description="why the coordinator quarantined this worker (a failed spot check): paid "
        "nothing and routed nothing from then on; null while in good standing"
    )
    unreachable: str | None = Field(
        default=None, description="'not reachable from the coordinator: tried <address> (<why>); ...' when the "
        "coordinator's last direct dial of every announced address failed (no relay); null when one answered or "
        "none was dialled yet"
    )


class UsageRecord(_Strict):
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


class UsageRequest(_Strict):
    records: list[UsageRecord] = Field(min_length=1, max_length=1000)


class UsageResponse(BaseModel):
    accepted: list[str] = Field(description="ids now on the ledger (new ones and ones already counted)")


CLIENT_KEY_ID_PATTERN = r"^[0-9a-f]{32}$"


class Receipt(_Strict):
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


class ReceiptsRequest(_Strict):
    receipts: list[Receipt] = Field(min_length=1, max_length=1000)


class ReceiptsResponse(BaseModel):
    accepted: list[str] = Field(description="receipt ids now on the ledger (new ones and ones already counted)")
    duplicates: list[str] = Field(
        description="receipt ids not counted: another receipt already vouches for the same server session"
    )


class DeregisterRequest(_Strict):
    reason: str = Field(default="shutdown", max_length=256)


class DeregisterResponse(BaseModel):
    worker_id: str
    state: str


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
    earnings_far: float = Field(description="paid: the claims' earnings scaled to the attested + vouched share")
    reliability: float = Field(description="observed uptime, scaled down by the attested share on an over-claim")
    uptime_pct: float = Field(description="100 x (up_intervals + 1) / intervals since registration (its own counts)")
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
    reachable: bool | None = Field(default=None, description="whether the coordinator's last direct dial (no relay) "
                                   "of its announced addresses connected; null: not dialled yet")
    reachability_checked_at: float | None = None
    reachability_problem: str | None = Field(default=None, description="the addresses dialled and why each failed, "
                                             "when none connected")
    host_id: str | None = Field(default=None, description="the host it registered from (see GET /v1/hosts)")
    instance: int | None = Field(default=None, description="its index on that host (one worker per GPU)")


class WorkerList(BaseModel):
    workers: list[WorkerView]


class HostView(BaseModel):
    host_id: str | None = Field(description="as the workers registered it; null groups workers that sent none")
    wallet_addresses: list[str] = Field(description="the payout wallets of the host's workers")
    worker_ids: list[str] = Field(description="one worker per GPU, by instance index")
    workers_online: int = Field(description="of them, online now (as GET /v1/workers says)")
    tokens_served: int = Field(description="the sum of the workers' tokens_served")
    tokens_attested: int
    claimed_far: float
    earnings_far: float = Field(description="the sum of the workers' earnings_far: what the host was paid")
    earn_rate_far_per_hour: float


class HostList(BaseModel):
    hosts: list[HostView]


class _Generation(_Strict):
    """The generation fields shared by completions and chat completions (OpenAI's names and meanings)."""

    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(
        default=0.0, ge=0, le=10, description="0 = greedy (and so is any temperature below 1e-6); greedy by default"
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling (with a temperature above 0)")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1,
                             description="sampling seed: the same seed gives the same tokens when run alone")
    stop: str | Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)] | None = (
        Field(default=None, description="up to 4 strings; the completion ends before the first one (needs text)"))
    n: int = Field(default=1, ge=1, le=1, description="choices per request: 1")
    stream: bool = Field(default=False, description="server-sent events, one per token, then data: [DONE]")
    user: str | None = Field(default=None, max_length=256, description="the end user, for the operator's records")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Generation):
    prompt: str | list[Annotated[int, Field(ge=0)]] = Field(
        description="text (needs a tokenizer) or token ids"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_or_token_ids(cls, value):
        """One error naming ``prompt``, where the union would name its members (prompt.str,
        prompt.list[constrained-int].0); and JSON true/false or 2.0 are not token ids."""
        if not isinstance(value, str) and not (
            isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)
        ):
            raise ValueError("prompt must be text or a list of token ids (integers >= 0)")
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000, description="text (content parts are not supported)")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class Contribution(BaseModel):
    peer_id: str
    worker_id: str | None
    blocks: list[int]
    tokens: int = Field(description="tokens this span processed for the request")


class CompletionChoice(BaseModel):
    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    route: list[Contribution] = Field(description="which workers served which blocks for this request")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    route: list[Contribution] = Field(description="which workers served which blocks for this request")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "far-mesh"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class KeyUsage(BaseModel):
    key_name: str
    completions: int
    prompt_tokens: int
    completion_tokens: int


class KeyUsageList(BaseModel):
    keys: list[KeyUsage]


class ErrorResponse(BaseModel):
    error: str = Field(description="one line: what is wrong and what is accepted")
    field: str | None = Field(default=None, description="the offending field, dotted (records.0.tokens)")
    code: str | None = Field(
        default=None,
        description="bad_signature, replay, unregistered, forbidden, "
        "unknown_worker, invalid_payload, body_too_large, no_model, mesh_unavailable",
    )
    detail: list[dict] | None = Field(default=None, description="every invalid field, for 422")
