"""How far this host's clock is from the coordinator's, read from its HTTP ``Date`` header, and the rule on it.

The coordinator refuses a signed report whose timestamp is more than identity.DEFAULT_WINDOW_S (60 s) from its
clock, with 401 "clock skew or replay". A worker whose clock is minutes off would repeat that 401 forever;
measured from the Date header, it says what is wrong instead.

The measure is good to a few seconds, plenty against 30 s: a Date names a whole second (the coordinator's clock
was somewhere in the second after it, so its middle is taken), uvicorn refreshes the header it sends about once a
second (up to a second more behind, under load more), and the request's own time counts half.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from farworker.identity import DEFAULT_WINDOW_S

MAX_OFFSET_S = 30.0  # `check` fails beyond this: half the coordinator's window, so drift has room before refusals
NTP_FIX = "fix NTP (timedatectl set-ntp true, chrony)"
DATE_RESOLUTION_S = 1.0  # an HTTP Date is truncated to the second (RFC 9110 5.6.7)


def offset_from_date(date_header: str | None, sent_at: float, received_at: float) -> float | None:
    """This host's clock minus the coordinator's, in seconds (positive: ahead); None without a usable Date.
    ``sent_at``/``received_at``: this host's time.time() around the request; the Date is taken at its middle."""
    if not date_header:
        return None
    try:
        theirs = parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return None
    return (sent_at + received_at) / 2 - (theirs + DATE_RESOLUTION_S / 2)


def describe(offset: float) -> str:
    """'312 s ahead of' / '45 s behind' the coordinator's clock."""
    return f"{abs(offset):.0f} s {'ahead of' if offset > 0 else 'behind'}"


def clock_problem(offset: float | None, limit: float = MAX_OFFSET_S) -> str | None:
    """None when the offset is unknown or within ``limit``, else the line `check` fails with."""
    if offset is None or abs(offset) <= limit:
        return None
    return (f"this host's clock is {describe(offset)} the coordinator's; signed reports are refused beyond "
            f"{DEFAULT_WINDOW_S} s: {NTP_FIX}")


def journal_line(offset: float) -> str:
    """The worker's log line while its clock is off (instead of one 401 per report)."""
    return (f"clock is {offset:+.0f} s off the coordinator's ({describe(offset)}); signed reports beyond "
            f"{DEFAULT_WINDOW_S} s are refused until it is fixed: {NTP_FIX}")
