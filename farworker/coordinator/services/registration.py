"""Who may register, and how fast: floods are shed before they cost the coordinator anything.

Registration is free (anyone can make a key), so three rules bound what a flood can take:

- a rate per source address (an IPv6 source counts by its /64, what one host gets), checked before the
  signature, the body or the database are looked at; the excess answers 429 with Retry-After;
- an optional allowlist of wallet addresses, peer ids or public keys (a wallet entry admits anyone naming that
  wallet, whose earnings go to it; a peer id or key entry admits only the holder of the key);
- a bound on *unproven* workers: registered, with no attested work and no passed probe yet. A new worker beyond
  it is refused with 503 and Retry-After until one proves itself or ages out (``unproven_ttl_s`` after its
  registration it no longer holds a place; its row stays on the ledger). A worker registering again (a restart,
  its span learnt) is never refused by the bound: it holds its place already.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from contextlib import contextmanager

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from farworker.coordinator.errors import ApiError


class Refused(ApiError):
    """A refusal that says when to try again (answered with a Retry-After header)."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: float, field: str | None = None):
        super().__init__(status, message, code, field, retry_after_s=max(1, math.ceil(retry_after_s)))


def check_rate(rate: str | None) -> str | None:
    """``rate`` in the limits library's notation ("30/minute", "5 per second"), or ValueError naming what is
    accepted; "" and None: no limit."""
    if not rate:
        return None
    try:
        parse(rate)
    except ValueError:
        raise ValueError(f"registration rate {rate!r}: expected COUNT/PERIOD, e.g. 30/minute or 5/second") from None
    return rate


def source_of(host: str | None) -> str:
    """The key a client's address counts under: an IPv4 address itself, an IPv6 address its /64."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class RegistrationGate:
    """The three rules over one store, with the coordinator's settings (in memory: the rate's windows start
    again when the coordinator restarts)."""

    def __init__(self, settings, store):
        self.settings, self.store = settings, store
        self._rate = parse(check_rate(settings.registration_rate)) if settings.registration_rate else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._admission = threading.Lock()  # the count of unproven workers and the insert, as one step

    def check_rate(self, host: str | None) -> None:
        """One registration from ``host``, or 429 when its source has used its rate."""
        if self._rate is None:
            return
        source = source_of(host)
        if self._limiter.hit(self._rate, source):
            return
        reset_at = self._limiter.get_window_stats(self._rate, source).reset_time
        raise Refused(429, f"too many registrations from {source}: at most {self.settings.registration_rate}",
                      "rate_limited", reset_at - time.time())

    def check_allowed(self, registration: dict) -> None:
        """With an allowlist, the registration's wallet, peer id or public key must be on it (403 otherwise)."""
        allowed = self.settings.registration_allowlist
        if allowed and not allowed & {registration["wallet_address"], registration["peer_id"],
                                      registration["public_key"]}:
            raise ApiError(403, "wallet_address, peer_id and public_key are not on this coordinator's registration "
                           "allowlist", "not_allowed", "wallet_address")

    @contextmanager
    def admission(self, peer_id: str, now: float):
        """Room for the worker of ``peer_id`` among the unproven ones, held while the caller registers it."""
        with self._admission:
            if self.store.worker_by_peer(peer_id) is None:
                since = now - self.settings.unproven_ttl_s
                count, oldest = self.store.unproven_workers(since)
                if count >= self.settings.max_unproven_workers:
                    raise Refused(503, f"this coordinator holds {count} workers that have not proven themselves "
                                  f"yet (at most {self.settings.max_unproven_workers}); try again later",
                                  "too_many_unproven", oldest + self.settings.unproven_ttl_s - now)
            yield
