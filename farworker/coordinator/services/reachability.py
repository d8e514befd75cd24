"""Reachability: can the coordinator open a direct connection to a worker at the addresses it announced?

The job health.petals.dev did for the public swarm. A worker behind NAT, a firewall or with a wrong
FARLABS_ANNOUNCE_MADDRS still joins the DHT (its connections go out), but clients cannot dial it, or only
through a relay. The coordinator dials each announced address on its own, never through a relay
(farworker.petals.compat.dial_directly), with every spot check; the answer is stored per worker, shown in
``GET /v1/workers/{id}`` and returned in each heartbeat answer, so the worker's journal, ``farworker status`` and
``farworker check`` say it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from farworker.petals.compat import dial_directly

DIAL_TIMEOUT = 5.0  # seconds per address: a loopback or LAN dial takes milliseconds, a distant one < 1 s
MAX_ADDRESSES = 8  # dialled per check (a registration may list 64); the first ones are the worker's own order
RELAYED = "/p2p-circuit"  # a relayed address proves nothing about direct reachability: not dialled


@dataclass(frozen=True)
class Reachability:
    at: float
    tried: dict[str, str | None]  # address -> None (connected) or why not

    @property
    def reachable(self) -> bool:
        return any(why is None for why in self.tried.values())

    @property
    def problem(self) -> str | None:
        """The one line a worker's operator reads; None when an address answered."""
        if self.reachable:
            return None
        if not self.tried:
            return "not reachable from the coordinator: the worker announces no direct address"
        tried = "; ".join(f"{address} ({why})" for address, why in self.tried.items())
        return f"not reachable from the coordinator: tried {tried}"

    def to_json(self) -> str:
        return json.dumps({"at": self.at, "tried": self.tried})


def check(peer_id: str, announce_maddrs: list[str], at: float) -> Reachability:
    """Dial the worker's announced direct addresses (at most MAX_ADDRESSES), each on its own."""
    addresses = [a for a in announce_maddrs if RELAYED not in a][:MAX_ADDRESSES]
    return Reachability(at, dial_directly(peer_id, addresses, DIAL_TIMEOUT) if addresses else {})


def view(stored: str | None) -> dict:
    """The worker view's fields from what the store holds (None: not checked yet)."""
    if not stored:
        return {"reachable": None, "reachability_checked_at": None, "reachability_problem": None}
    record = json.loads(stored)
    result = Reachability(record["at"], record["tried"])
    return {"reachable": result.reachable, "reachability_checked_at": result.at,
            "reachability_problem": result.problem}
