"""The earnings formula of the reference coordinator (one place, so docs, answers and ledger agree).

For each usage record a worker reports, once (by record id)::

    earned_far = tokens × share × reliability × FAR_PER_TOKEN
    share      = (end − start) / total_blocks        the part of the model the record's blocks are
    reliability = uptime_pct / 100                   taken when the record is accepted

Uptime is what the coordinator observed, per heartbeat interval since registration: a worker up at every
interval since it first registered has 100 %; ``beats_expected = 1 + floor(elapsed / interval)`` (the "1" is
the registration itself), and ``uptime_pct = 100 × min(1, (up_intervals + 1) / beats_expected)``, where
``up_intervals`` counts the interval slots after the registration's that had a healthy beat (one per slot,
however fast a worker beats) and, when the coordinator has a mesh view (a model and initial peers), in which
its DHT watch also saw the worker's whole span ONLINE (coordinator/dht_watch.py). Without a mesh view a healthy
beat alone counts (``uptime_basis: beats``). No slot counts from a quarantine on.
A worker not heard from for ``OFFLINE_AFTER_INTERVALS`` intervals (+ ``OFFLINE_SLACK_S``) is shown
``offline``, whatever state it last reported.

``total_blocks`` is the coordinator's own figure when it knows the model (its model directory's
``num_hidden_layers``, or ``Settings.model_blocks``); otherwise the worker's reported ``total_blocks``,
and with neither the worker's own ``end`` (share 1 of what it claims, logged as such).

**Paid is attested, never claimed alone.** A worker's usage records are its *claims*. What pays is what
the coordinator's own petals client saw the worker serve: each completion's route (peer id, span, tokens
per server session, retries included) is the *attestation*. Claims and attestations are compared in
token-blocks (tokens x blocks of the span), so a claim for a wider span than the worker was routed for is
cut too::

    paid_far = claimed_far x min(1, attested token-blocks / claimed token-blocks)

**Direct traffic is paid when a client vouches for it.** Petals clients that use the mesh without the
coordinator sign a receipt per server session (peer id, span, tokens, session id) with a key the operator
registered (``--client-keys``); a receipt counts once and only for the peer it names. Vouched token-blocks
count like attested ones::

    covered  = min(1, (attested + vouched token-blocks) / claimed token-blocks)
    paid_far = claimed_far of the cheapest covered x claimed token-blocks
               + unvouched_rate x the rest of claimed_far

``unvouched_rate`` (``--pay-unvouched-rate``, 0..1) is 0 by default: claims nobody attested or vouched for
(direct traffic without receipts) are shown as ``unvouched_tokens`` and not paid.

A claim above what was attested and vouched for by more than
``max(ATTESTED_SLACK_TOKENS, ATTESTED_SLACK_SHARE x covered)`` tokens (records and routes arrive at slightly
different times) is an over-claim: logged, shown as ``unvouched_tokens``, and it scales the worker's
reliability by the same covered fraction.

The earn-rate estimate in heartbeat answers is what the ledger credited over the trailing hour (or since
registration, if shorter, but at least one interval), scaled to one hour.
"""

from __future__ import annotations

import math

DEFAULT_FAR_PER_TOKEN = 0.001
OFFLINE_AFTER_INTERVALS = 3
OFFLINE_SLACK_S = 10.0
EARN_RATE_WINDOW_S = 3600.0


def interval_slot(registered_at: float, at: float, interval: float) -> int:
    """Which heartbeat interval since registration ``at`` falls in (0: the registration's own)."""
    return math.floor(max(0.0, at - registered_at) / interval)


def is_offline(last_seen: float, now: float, interval: float) -> bool:
    """No beat (or registration) for OFFLINE_AFTER_INTERVALS intervals and some slack: the worker is gone,
    whatever state it last reported (a worker killed while draining never says so)."""
    return now - last_seen > OFFLINE_AFTER_INTERVALS * interval + OFFLINE_SLACK_S


def uptime_fraction(heartbeats: int, registered_at: float, now: float, interval: float) -> float:
    elapsed = max(0.0, now - registered_at)
    expected = 1 + math.floor(elapsed / interval)
    return min(1.0, (heartbeats + 1) / expected)


def block_share(start: int, end: int, total_blocks: int) -> float:
    return max(0.0, min(1.0, (end - start) / total_blocks))


def earned_far(tokens: int, share: float, reliability: float, far_per_token: float) -> float:
    return tokens * share * reliability * far_per_token


def earn_rate_window(registered_at: float, now: float, interval: float) -> float:
    return min(EARN_RATE_WINDOW_S, max(interval, now - registered_at))


ATTESTED_SLACK_TOKENS = 64  # a worker's records may run ahead of the routes recorded (in-flight completions)
ATTESTED_SLACK_SHARE = 0.02


def attested_fraction(claimed_token_blocks: int, attested_token_blocks: int) -> float:
    """The share of a worker's claims the coordinator attested (1 with nothing claimed)."""
    if claimed_token_blocks <= 0:
        return 1.0
    return max(0.0, min(1.0, attested_token_blocks / claimed_token_blocks))


def paid_far(payable_by_price: list[tuple[int, float]], claimed_token_blocks: int, covered_token_blocks: int,
             unvouched_rate: float = 0.0) -> float:
    """What a worker is paid: its payable claims' $FAR for the covered (attested or vouched) share of its claimed
    token-blocks, those valued cheapest first, and the rest of its payable claims at ``unvouched_rate``.

    ``payable_by_price`` is [(token-blocks, $FAR)] of the claims that may pay (not after a quarantine), cheapest
    $FAR per token-block first. Claims differ in worth per token-block (the reliability when each arrived);
    valuing the covered ones cheapest first means a claim nobody vouched for, added at a better reliability,
    never raises what the covered ones pay."""
    payable_tb = sum(tb for tb, _ in payable_by_price)
    payable = sum(far for _, far in payable_by_price)
    budget = attested_fraction(claimed_token_blocks, covered_token_blocks) * payable_tb
    covered_far = 0.0
    for tb, far in payable_by_price:
        take = min(tb, budget)
        if take <= 0:
            break
        covered_far += far * take / tb
        budget -= take
    return covered_far + max(0.0, min(1.0, unvouched_rate)) * (payable - covered_far)


def over_claimed(claimed_tokens: int, attested_tokens: int) -> bool:
    slack = max(ATTESTED_SLACK_TOKENS, ATTESTED_SLACK_SHARE * attested_tokens)
    return claimed_tokens - attested_tokens > slack
