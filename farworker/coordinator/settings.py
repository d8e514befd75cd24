"""Settings: everything a coordinator is started with, built once (by `farworker coordinator`, demo or tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from farworker.catalog import dht_prefix_for
from farworker.coordinator.services.audit import DEFAULT_AUDIT_SHARE
from farworker.coordinator.services.ledger import DEFAULT_FAR_PER_TOKEN

DEFAULT_SAMPLE_ROUTED = 0.05  # one routed completion in 20 (docs/trust.md, "Spot checks": its cost)
DEFAULT_SETTLE_AFTER_S = 86400.0  # a day: time for audits and probes to catch a cheater before it is paid
# Registrations per source address (an IPv6 source: its /64), in the `limits` library's notation. A worker
# registers at start and again when it learns its span: a host of 8 GPUs restarting at once sends 16.
DEFAULT_REGISTRATION_RATE = "30/minute"
# New workers that have not proven themselves yet (no attested work, no passed probe) held at once; beyond it new
# registrations are refused with 503 until one proves itself or ages out (services/registration.py).
DEFAULT_MAX_UNPROVEN = 256
DEFAULT_UNPROVEN_TTL_S = 3600.0  # an hour to load a model and answer a probe, then it no longer holds a place


def is_database_url(target) -> bool:
    """A database URL (postgresql://...) rather than a SQLite file path."""
    return isinstance(target, str) and "://" in target


def display_target(target) -> str:
    """The database for messages and logs: a URL without its password."""
    text = str(target)
    if not is_database_url(text) or "@" not in text:
        return text
    scheme, rest = text.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else text


@dataclass
class Settings:
    db_path: Path | str  # a SQLite file, or a postgresql:// URL (the store several coordinators share)
    heartbeat_interval_s: float = 30.0
    signature_window_s: int = 60
    max_body_bytes: int = 1 << 20
    far_per_token: float = DEFAULT_FAR_PER_TOKEN
    # the mesh, for /v1/completions (none configured: the route answers 503)
    model_path: Path | None = None
    model_name: str | None = None  # names the model for the ledger and the DHT prefix; default: dir name
    initial_peers: tuple[str, ...] = ()
    dht_prefix: str | None = None
    model_blocks: dict[str, int] = field(default_factory=dict)  # model name -> block count, for the ledger
    probe_period_s: float = 300.0  # spot checks of each online worker (with a model configured); 0: none
    # Share of routed completions whose first step on one worker is verified (spot_check.RoutedChecks); None:
    # DEFAULT_SAMPLE_ROUTED with probes on, 0 with probes off (probe_period_s 0: no spot checks of any kind).
    sample_routed: float | None = None
    # Share of server sessions audited at every position (services/audit.AuditSampler: new workers and those near
    # their tolerance at a higher share); None: DEFAULT_AUDIT_SHARE with probes on, 0 with probes off.
    audit_share: float | None = None
    max_active_generations: int = 8  # petals inference sessions the coordinator runs at once
    # Requests waiting for a slot; beyond: 429 with Retry-After. A waiting (or running) non-streamed request holds
    # one of the server's 40 request threads, which the workers' heartbeats need too: 8 + 16 leaves them 16.
    max_queued_generations: int = 16
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> its name; empty: the inference API is open
    # direct clients whose receipts vouch for traffic: key id -> (name, Ed25519 public key, base64); empty: none
    client_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    pay_unvouched_rate: float = 0.0  # share of claims nobody attested or vouched for that is paid anyway (0..1)
    # Seconds a worker's earnings stay pending before they settle; a quarantine forfeits what is still pending
    # (services/ledger.settled_until, docs/trust.md "Settlement"). 0: everything settles at once.
    settle_after_s: float = DEFAULT_SETTLE_AFTER_S
    # The mesh page (GET /) shows wallet addresses shortened (0x1234…abcd) instead of in full; JSON at /v1 is
    # unchanged (the workers' own tools read it).
    hide_wallets: bool = False
    # Floods are shed (services/registration.py): a rate per source ("" or None: no limit), who may register
    # (wallet addresses, peer ids or public keys; empty: anyone), and the bound on unproven workers.
    registration_rate: str | None = DEFAULT_REGISTRATION_RATE
    registration_allowlist: frozenset[str] = frozenset()
    max_unproven_workers: int = DEFAULT_MAX_UNPROVEN
    unproven_ttl_s: float = DEFAULT_UNPROVEN_TTL_S

    def __post_init__(self):
        if not is_database_url(self.db_path):
            self.db_path = Path(self.db_path)
        self.registration_allowlist = frozenset(self.registration_allowlist)
        if not self.max_unproven_workers >= 1:
            raise ValueError(f"max_unproven_workers must be 1 or more, got {self.max_unproven_workers}")
        if not self.unproven_ttl_s > 0:
            raise ValueError(f"unproven_ttl_s must be more than 0 seconds, got {self.unproven_ttl_s}")
        if not self.settle_after_s >= 0:  # NaN too
            raise ValueError(f"settle_after_s must be 0 or more seconds, got {self.settle_after_s}")
        self.initial_peers = tuple(self.initial_peers)
        if self.sample_routed is None:
            self.sample_routed = DEFAULT_SAMPLE_ROUTED if self.probe_period_s > 0 else 0.0
        if self.audit_share is None:
            self.audit_share = DEFAULT_AUDIT_SHARE if self.probe_period_s > 0 else 0.0
        if self.model_path is not None:
            self.model_path = Path(self.model_path)
            self.model_name = self.model_name or self.model_path.name
            # the prefix the workers' petals servers announce under (farworker.petals.server_host does the same)
            self.dht_prefix = self.dht_prefix or dht_prefix_for(self.model_name)
            config = self.model_path / "config.json"
            if config.is_file() and self.model_name not in self.model_blocks:
                layers = json.loads(config.read_text()).get("num_hidden_layers")
                if isinstance(layers, int) and layers > 0:
                    self.model_blocks[self.model_name] = layers

    def served_models(self) -> list[str]:
        """The models workers may register for: the one named (--model-name, or the model directory's name) and
        those whose size is configured; empty: any."""
        return sorted(set(self.model_blocks) | ({self.model_name} if self.model_name else set()))

    @property
    def has_mesh(self) -> bool:
        """A model to route completions through (and to spot-check workers against)."""
        return self.model_path is not None

    @property
    def watches_dht(self) -> bool:
        """The coordinator has a mesh view: its DHT watch decides which intervals count as up."""
        return self.has_mesh and bool(self.initial_peers)
