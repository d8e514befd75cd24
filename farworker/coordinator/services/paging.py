"""Pages of the list endpoints: ``limit`` items at most, and an opaque ``cursor`` for the next page.

The order is stable (registration time, then id, for workers; host id for hosts): a new item lands at the end,
so walking the cursors sees every item that existed when the walk began, once. The cursor is the last item's
sort key, base64url JSON: opaque to clients, checked when it comes back (400 naming ``cursor``).
"""

from __future__ import annotations

import base64
import binascii
import json

from farworker.coordinator.errors import ApiError

DEFAULT_LIMIT = 100  # more than any private mesh's workers: clients that never page see them all
MAX_LIMIT = 1000  # one page's views cost ~1 ms each to build


def _bad(why: str) -> ApiError:
    return ApiError(400, f"invalid cursor: {why}; pass the next_cursor of the previous page, or none for the first",
                    "invalid_cursor", "cursor")


def cursor_of(*key) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode().rstrip("=")


def decode(cursor: str | None, kinds: tuple[type, ...]) -> tuple | None:
    """The sort key a cursor carries (None for the first page); 400 when it is not one this coordinator made."""
    if cursor is None:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise _bad("not a cursor this coordinator made") from None
    if not (isinstance(key, list) and len(key) == len(kinds)
            and all(isinstance(v, k) and not isinstance(v, bool) for v, k in zip(key, kinds, strict=True))):
        raise _bad("not a cursor this coordinator made")
    return tuple(key)


def after(cursor: str | None) -> tuple[float, str] | None:
    """A workers page's cursor: (registered_at, worker_id) of the last worker on the previous page."""
    return decode(cursor, ((int, float), str))


def after_host(cursor: str | None) -> tuple[int, str] | None:
    """A hosts page's cursor: (1 for the group without host id else 0, host id) of the previous page's last."""
    return decode(cursor, (int, str))
