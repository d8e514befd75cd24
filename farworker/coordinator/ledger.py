"""The earnings formula of the reference coordinator (one place, so docs, answers and ledger agree).

For each usage record a worker reports, once (by record id)::

    earned_far = tokens × share × reliability × FAR_PER_TOKEN
    share      = (end − start) / total_blocks        the part of the model the record's blocks are
    reliability = uptime_pct / 100                   taken when the record is accepted

Uptime comes from heartbeats: a worker that beat at every interval since it first registered has
100 %; ``beats_expected = 1 + floor(elapsed / interval)`` (the "1" is the registration itself), and
``uptime_pct = 100 × min(1, (heartbeats + 1) / beats_expected)``.

``total_blocks`` is the coordinator's own figure when it knows the model (its model directory's
``num_hidden_layers``, or ``Settings.model_blocks``); otherwise the worker's reported ``total_blocks``,
and with neither the worker's own ``end`` (share 1 of what it claims, logged as such).

The earn-rate estimate in heartbeat answers is what the ledger credited over the trailing hour (or since
registration, if shorter, but at least one interval), scaled to one hour.
"""

from __future__ import annotations

import math

DEFAULT_FAR_PER_TOKEN = 0.001
EARN_RATE_WINDOW_S = 3600.0


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
