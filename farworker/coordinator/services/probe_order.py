"""Which workers the probe loop goes to, and in what order: workers that serve first, floods last.

A round (coordinator/spot_check.SpotCheckLoop) starts every probe period. It probes every serving worker (tier 0),
then at least one more, then the others while the period lasts; what it does not reach waits for the next round,
at the front of its tier. Tiers, in order:

0. proven workers (a passed probe, attested work) whose last probe was answered: what the mesh runs on;
1. workers whose last probe was answered, or never probed yet (a new honest worker is here, ahead of any
   worker that failed to answer);
2. workers that failed to answer their last probes, fewer than UNREACHABLE_AFTER in a row;
3. unreachable workers: UNREACHABLE_AFTER or more unanswered in a row. They are probed rarely, after
   2, 4, ... up to MAX_BACKOFF_PERIODS periods, and are not quarantined: not answering is not a wrong answer.

Within a tier the least recently probed goes first, then the earliest registered. So a flood of registrants that
do not serve costs one unanswered probe each before they fall behind every worker that answers, and the bound on
unproven workers (services/registration.py) caps how many can be new at once.
"""

from __future__ import annotations

UNREACHABLE_AFTER = 3  # unanswered probes in a row that mark a worker unreachable
MAX_BACKOFF_PERIODS = 16  # an unreachable worker is still probed at least this often (periods)


def unreachable(unanswered: int) -> bool:
    return unanswered >= UNREACHABLE_AFTER


def backoff_periods(unanswered: int) -> int:
    """Periods between probes of a worker with ``unanswered`` probes in a row unanswered."""
    if not unreachable(unanswered):
        return 1
    return min(MAX_BACKOFF_PERIODS, 2 ** (unanswered - UNREACHABLE_AFTER + 1))


def due(stat: dict | None, now: float, period: float) -> bool:
    """A reachable worker is probed every round; an unreachable one once its back-off has passed (half a period
    early: rounds do not start on the exact second)."""
    if stat is None or not unreachable(stat["unanswered"]):
        return True
    return now - stat["last_at"] >= (backoff_periods(stat["unanswered"]) - 0.5) * period


def tier(row: dict, proven: set[str], stat: dict | None) -> int:
    unanswered = stat["unanswered"] if stat else 0
    if unanswered == 0:
        return 0 if row["worker_id"] in proven else 1
    return 3 if unreachable(unanswered) else 2


def order(rows: list[dict], proven: set[str], stats: dict[str, dict], now: float, period: float) -> list[dict]:
    """The rows due for a probe, in the order the round probes them, each with its ``probe_tier``."""
    def key(row):
        stat = stats.get(row["worker_id"])
        return row["probe_tier"], stat["last_at"] if stat else float("-inf"), row["registered_at"], row["worker_id"]

    due_rows = [{**r, "probe_tier": tier(r, proven, stats.get(r["worker_id"]))} for r in rows
                if due(stats.get(r["worker_id"]), now, period)]
    return sorted(due_rows, key=key)


def round_goes_on(row: dict, probed_beyond_serving: int, time_left: float) -> bool:
    """Whether a round probes ``row`` next. Serving workers (tier 0) always: what the mesh runs on is checked every
    round, however many there are. Beyond them, at least one each round (so a new worker is never starved), then
    only while the round has time left."""
    return row["probe_tier"] == 0 or probed_beyond_serving == 0 or time_left > 0


def view(stat: dict | None) -> dict:
    """The worker view's fields: unanswered probes in a row, and whether that marks it unreachable."""
    unanswered = stat["unanswered"] if stat else 0
    return {"unanswered_probes": unanswered, "probe_unreachable": unreachable(unanswered)}


def problem(unanswered: int) -> str | None:
    """The line a worker marked unreachable hears in its heartbeat answers (None while it is not)."""
    if not unreachable(unanswered):
        return None
    return (f"not reachable from the coordinator: its last {unanswered} probes got no answer; probed every "
            f"{backoff_periods(unanswered)} probe periods until one is answered")
