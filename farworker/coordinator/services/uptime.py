"""Observed uptime and live state: which workers the DHT shows serving, how many interval slots count as up, and
the state a worker is shown in (docs/trust.md, "Observed uptime and state")."""

from __future__ import annotations

from dataclasses import dataclass

from farworker.coordinator.services import ledger
from farworker.coordinator.services.ledger import interval_slot, is_offline


def online_workers(rows, states: list[dict[str, str]]) -> list[str]:
    """The worker ids whose whole span is ONLINE; ``states`` holds one {peer id: state} per block, from block 0."""
    online = []
    for row in rows:
        start, end = row["block_start"], row["block_end"]
        if start is None or end is None or not 0 <= start < end <= len(states):
            continue  # no span yet (registered before loading) or one the model does not have: not serving
        if all(states[block].get(row["peer_id"]) == "ONLINE" for block in range(start, end)):
            online.append(row["worker_id"])
    return online


def _quarantine_slot(store, row) -> int | None:
    quarantined = store.quarantine_of(row["worker_id"])
    return (interval_slot(row["registered_at"], quarantined["since"], row["heartbeat_interval"])
            if quarantined else None)


_READ = object()  # up_intervals' ``until`` not given: it reads the quarantine itself


def up_intervals(store, row, with_dht: bool, until: int | None = _READ) -> int:
    """Interval slots after the registration's that count as up: a healthy beat in the slot, and (``with_dht``:
    the coordinator watches the mesh) the span seen ONLINE in the DHT in that same slot. Nothing from the slot of
    a quarantine on (``until``: that slot, when the caller has read it already)."""
    if until is _READ:
        until = _quarantine_slot(store, row)
    if with_dht:
        return store.count_slots(row["worker_id"], online=True, before=until)
    # beats only: the running count (ledgers from before uptime_slots have no slots for their older beats)
    count = int(row["heartbeat_count"])
    if until is not None:
        count -= store.count_slots(row["worker_id"], online=False, from_slot=until)
    return max(0, count)


@dataclass(frozen=True)
class ObservedUptime:
    """A worker's observed uptime now (docs/trust.md, "Observed uptime and state")."""

    up: int  # slots counted as up (up_intervals)
    basis: int  # slots judged over (services/ledger.uptime_basis)
    new: bool  # too little observed to say (services/ledger.is_new): shown as "new"

    @property
    def fraction(self) -> float:
        return ledger.uptime_fraction(self.up, self.basis)


def observe(store, row, with_dht: bool, now: float) -> ObservedUptime:
    """Up slots over the slots since the worker was first up, the one in progress only once it is up."""
    until = _quarantine_slot(store, row)
    up = up_intervals(store, row, with_dht, until)
    first = store.first_slot(row["worker_id"], online=with_dht, before=until)
    if first is None and not with_dht and up > 0:
        first = 1  # a ledger from before uptime_slots: its beats counted from the first slot after registration's
    current = interval_slot(row["registered_at"], now, row["heartbeat_interval"])
    current_up = (until is None or current < until) and store.count_slots(
        row["worker_id"], online=with_dht, from_slot=current, before=current + 1) > 0
    basis = ledger.uptime_basis(first, current, current_up)
    return ObservedUptime(up=up, basis=basis, new=ledger.is_new(first, basis))


def live_state(row, quarantined: bool, now: float) -> str:
    """What the coordinator observes: quarantined, offline after missed beats, else what the worker said."""
    if quarantined:
        return "quarantined"
    last_seen = row["last_heartbeat_at"] or row["last_registered_at"]
    return "offline" if is_offline(last_seen, now, row["heartbeat_interval"]) else row["state"]
