"""Lease: which coordinator replica runs the loops that sweep every worker (probes, DHT watch), so that they run once
however many replicas share the database.

The lease is a row with a holder and an expiry (Store.take_lease). A replica holds it while it renews it before it
expires; any replica may take it once it has expired. With a TTL of one heartbeat interval and a try every third of
it, a dead holder's lease passes to another replica within 1 + 1/3 intervals: inside the 2 the ledger allows
(docs/trust.md: a worker's uptime is counted per interval, so the DHT watch may miss at most one).

Loops that work on one replica's own requests (routed first-step checks, session audits of the completions it
served) are not under the lease: each replica checks what it served, so nothing is checked twice. Settlement is
computed when the ledger is read (services/ledger.settled_until): it has no loop.

Replicas' clocks are compared through the expiry: keep them in sync (NTP), within a fraction of the TTL.
"""

from __future__ import annotations

import os
import socket
import uuid

BACKGROUND_LOOPS = "background-loops"  # the lease's name (one row)
TRIES_PER_TTL = 3  # renew (or try to take) the lease this many times per TTL


def ttl_for(heartbeat_interval_s: float) -> float:
    """One heartbeat interval: a dead holder is replaced within TTL + TTL/TRIES_PER_TTL < 2 intervals."""
    return float(heartbeat_interval_s)


def holder_name() -> str:
    """This replica, unique across restarts and hosts (a restarted replica must not inherit a lease by name)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """One named lease, tried by one replica. ``hold(now)`` takes or renews it and says whether this replica holds it;
    a failed renewal (the database unreachable) keeps it only until the expiry this replica last wrote."""

    def __init__(self, store, name: str, holder: str, ttl_s: float):
        if not ttl_s > 0:
            raise ValueError(f"a lease's TTL must be positive seconds, got {ttl_s}")
        self.store, self.name, self.holder, self.ttl_s = store, name, holder, ttl_s
        self._held_until = 0.0

    @property
    def retry_every_s(self) -> float:
        return self.ttl_s / TRIES_PER_TTL

    def hold(self, now: float) -> bool:
        try:
            taken = self.store.take_lease(self.name, self.holder, now, now + self.ttl_s)
        except Exception:  # the database is away: what we wrote last still stands until it expires
            return now < self._held_until
        self._held_until = now + self.ttl_s if taken else 0.0
        return taken

    def held(self, now: float) -> bool:
        return now < self._held_until

    def release(self) -> None:
        """Let another replica take it at once (a clean stop), instead of after the TTL."""
        self._held_until = 0.0
        self.store.release_lease(self.name, self.holder)
