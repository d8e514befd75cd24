"""The ledger formula's arithmetic: uptime, claimed, attested and paid $FAR of one worker, and the paid $FAR's
settlement (docs/trust.md, "The ledger formula" and its "Settlement")."""

from __future__ import annotations

import math

DEFAULT_FAR_PER_TOKEN = 0.001
EARN_RATE_WINDOW_S = 3600.0
ATTESTED_SLACK_TOKENS = 64  # a worker's records may run ahead of the routes recorded (in-flight completions)
ATTESTED_SLACK_SHARE = 0.02
PROBE_BLOCKS = 1  # a spot check's probe runs through one block: its tokens attest that many token-blocks
OFFLINE_AFTER_INTERVALS = 3
OFFLINE_SLACK_S = 10.0
NEW_WORKER_INTERVALS = 5  # slots judged before a worker's uptime stops reading "new"


def interval_slot(registered_at: float, at: float, interval: float) -> int:
    """Which heartbeat interval since registration ``at`` falls in (0: the registration's own)."""
    return math.floor(max(0.0, at - registered_at) / interval)


def is_offline(last_seen: float, now: float, interval: float) -> bool:
    """No beat (or registration) for OFFLINE_AFTER_INTERVALS intervals and some slack: the worker is gone,
    whatever state it last reported (a worker killed while draining never says so)."""
    return now - last_seen > OFFLINE_AFTER_INTERVALS * interval + OFFLINE_SLACK_S


def uptime_basis(first_up_slot: int | None, current_slot: int, current_up: bool) -> int:
    """The slots a worker's uptime is judged over: every completed slot from its first up slot on (before it the
    worker was loading, and served nobody; slot 0 is the registration's, never recorded), and the current slot
    once it is up (it cannot be down before it ends). A slot in progress without its beat yet is not a missed one:
    counting it made a worker up all along read 1 - 1/intervals (43 % after a few seconds on 2 s intervals).

    A worker never seen up is judged only once NEW_WORKER_INTERVALS slots after the registration's have ended (then
    over all of them, at 0 %): until then nothing is judged (100 %, as the registration's own slot always was), so
    an honest worker's first claims, sent before the DHT watch's first look at it, are not credited at 0."""
    if first_up_slot is None:
        return current_slot - 1 if current_slot > NEW_WORKER_INTERVALS else 0
    return max(0, current_slot - first_up_slot) + (1 if current_up else 0)


def uptime_fraction(up_slots: int, basis_slots: int) -> float:
    """Up slots / slots judged over, at most 1; 1 while there is nothing to judge (the registration's own slot)."""
    return 1.0 if basis_slots <= 0 else min(1.0, up_slots / basis_slots)


def is_new(first_up_slot: int | None, basis_slots: int) -> bool:
    """Too little observed to say: never seen up, or up for fewer than NEW_WORKER_INTERVALS slots. A new worker's
    uptime reads "new" (its figure is provisional), so nobody reads a worker of a few seconds as flaky."""
    return first_up_slot is None or basis_slots < NEW_WORKER_INTERVALS


def beat_slot(registered_at: float, counted_beat_at: float | None, now: float, interval: float,
              healthy: bool) -> int | None:
    """The slot a heartbeat at ``now`` counts for, or None when it counts for none. A healthy beat counts for its
    slot, once: beating faster earns nothing (a worker beating twice per interval for half an hour and then silent
    is up half the hour, not all of it); the registration stands for slot 0; a worker that says it is unhealthy
    is not up."""
    slot = interval_slot(registered_at, now, interval)
    last = 0 if counted_beat_at is None else interval_slot(registered_at, counted_beat_at, interval)
    return slot if healthy and slot > last else None


def online_slot(registered_at: float, now: float, interval: float) -> int | None:
    """The slot a DHT observation at ``now`` counts for; None in slot 0 (the registration's, up whatever happens)."""
    slot = interval_slot(registered_at, now, interval)
    return slot if slot > 0 else None


def block_share(start: int, end: int, total_blocks: int) -> float:
    return max(0.0, min(1.0, (end - start) / total_blocks))


def earned_far(tokens: int, share: float, reliability: float, far_per_token: float) -> float:
    return tokens * share * reliability * far_per_token


def earn_rate_window(registered_at: float, now: float, interval: float) -> float:
    return min(EARN_RATE_WINDOW_S, max(interval, now - registered_at))


def attested_fraction(claimed_token_blocks: int, attested_token_blocks: int) -> float:
    """The share of a worker's claims the coordinator attested (1 with nothing claimed)."""
    if claimed_token_blocks <= 0:
        return 1.0
    return max(0.0, min(1.0, attested_token_blocks / claimed_token_blocks))


def paid_shares(payable_by_price: list[tuple], claimed_token_blocks: int, covered_token_blocks: int,
                unvouched_rate: float = 0.0) -> list[float]:
    """The share of each price tier's $FAR that is paid (one per tier of ``payable_by_price``, in its order): the
    covered (attested or vouched) share of the claimed token-blocks, valued cheapest tier first, and
    ``unvouched_rate`` of the rest. Every claim of a tier is paid the same share of its $FAR (see paid_far)."""
    payable_tb = sum(tier[0] for tier in payable_by_price)
    budget = attested_fraction(claimed_token_blocks, covered_token_blocks) * payable_tb
    rate = max(0.0, min(1.0, unvouched_rate))
    shares = []
    for tier in payable_by_price:
        covered = max(0.0, min(1.0, budget / tier[0])) if tier[0] > 0 else 0.0
        budget -= covered * tier[0]
        shares.append(covered + rate * (1.0 - covered))
    return shares


def paid_far(payable_by_price: list[tuple], claimed_token_blocks: int, covered_token_blocks: int,
             unvouched_rate: float = 0.0) -> float:
    """What a worker is paid: its payable claims' $FAR for the covered (attested or vouched) share of its claimed
    token-blocks, those valued cheapest first, and the rest of its payable claims at ``unvouched_rate``.

    ``payable_by_price`` is [(token-blocks, $FAR, ...)] of the claims that may pay (not after a quarantine),
    grouped by $FAR per token-block, cheapest first. Claims differ in worth per token-block (the reliability when
    each arrived); valuing the covered ones cheapest first means a claim nobody vouched for, added at a better
    reliability, never raises what the covered ones pay."""
    shares = paid_shares(payable_by_price, claimed_token_blocks, covered_token_blocks, unvouched_rate)
    return sum(tier[1] * share for tier, share in zip(payable_by_price, shares, strict=True))


def settled_until(now: float, settle_after: float, quarantined_at: float | None) -> float:
    """Claims accepted at or before this time are settled (docs/trust.md, "Settlement"): those ``settle_after``
    seconds old, and of a quarantined worker only those that were so at its quarantine (the rest is forfeited)."""
    return min(now, math.inf if quarantined_at is None else quarantined_at) - settle_after


def settlement(payable_by_price: list[tuple[int, float, float]], covered_token_blocks: int, unvouched_rate: float,
               quarantined: bool) -> dict[str, float]:
    """Paid $FAR split by settlement: settled, pending, forfeited; the three add up to paid_far.

    ``payable_by_price`` is [(token-blocks, $FAR, $FAR of the claims accepted by settled_until)] per price tier,
    cheapest first, of the claims accepted before any quarantine: the claimed token-blocks are theirs. Each claim
    is paid its tier's share (paid_shares) and counts where its acceptance time puts it: settled, or else pending,
    or forfeited once its worker is quarantined."""
    claimed_tb = sum(tier[0] for tier in payable_by_price)
    shares = paid_shares(payable_by_price, claimed_tb, covered_token_blocks, unvouched_rate)
    paid = round(sum(tier[1] * share for tier, share in zip(payable_by_price, shares, strict=True)), 9)
    settled = round(sum(tier[2] * share for tier, share in zip(payable_by_price, shares, strict=True)), 9)
    unsettled = round(max(0.0, paid - settled), 9)
    return {"earnings_far": paid, "settled_far": settled,
            "pending_far": 0.0 if quarantined else unsettled, "forfeited_far": unsettled if quarantined else 0.0}


def over_claimed(claimed_tokens: int, attested_tokens: int) -> bool:
    slack = max(ATTESTED_SLACK_TOKENS, ATTESTED_SLACK_SHARE * attested_tokens)
    return claimed_tokens - attested_tokens > slack


def attested(totals: dict) -> tuple[int, int]:
    """(tokens, token-blocks) the coordinator attested: its completions' routes and its probes' answers."""
    return (totals["routed_tokens"] + totals["probed_tokens"],
            totals["routed_token_blocks"] + PROBE_BLOCKS * totals["probed_tokens"])


def figures(totals: dict, observed_uptime: float, window_s: float, unvouched_rate: float) -> dict:
    """Claimed, attested, paid and its settlement for one worker from its ledger totals (Store.ledger_totals, cut
    at its quarantine): paid never exceeds what was attested or vouched for, except at ``unvouched_rate``."""
    t = totals
    attested_tokens, attested_tb = attested(t)
    covered_tb = attested_tb + t["vouched_token_blocks"]
    covered_share = attested_fraction(t["claimed_token_blocks"], covered_tb)
    quarantined = t["quarantine"]
    settled = settlement(t["payable_by_price"], covered_tb, unvouched_rate, quarantined is not None)
    paid = settled["earnings_far"]
    paid_share = paid / t["payable_far"] if t["payable_far"] > 0 else 0.0
    over = over_claimed(t["claimed_tokens"], attested_tokens + t["vouched_tokens"])
    reliability = observed_uptime * (covered_share if over else 1.0)
    return {
        "tokens_served": t["claimed_tokens"],
        "tokens_attested": attested_tokens,
        "unattested_tokens": max(0, t["claimed_tokens"] - attested_tokens),
        "tokens_vouched": t["vouched_tokens"],
        "unvouched_tokens": max(0, t["claimed_tokens"] - attested_tokens - t["vouched_tokens"]),
        "claimed_far": round(t["claimed_far"], 9),
        **settled,  # earnings_far (paid) = settled_far + pending_far + forfeited_far
        "reliability": 0.0 if quarantined else round(reliability, 6),
        "uptime_pct": round(100 * observed_uptime, 3),
        "earn_rate_far_per_hour": round(t["payable_far_recent"] * paid_share * 3600 / window_s, 9),
        "quarantined": quarantined["reason"] if quarantined else None,
    }
