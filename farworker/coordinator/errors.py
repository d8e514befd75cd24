"""ApiError: a refusal a rule raises (status, one-line message, code, offending field); http.py answers it.
StoreFull: the ledger database refused a write for want of space (store.py raises it, answered 503)."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, field: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.field = status, message, code, field
        self.retry_after_s = retry_after_s  # sent as Retry-After


STORE_FULL_RETRY_AFTER_S = 10


class StoreFull(ApiError):
    """The ledger database refused a write because its disk is full; nothing of that write was kept. Answered 503
    with Retry-After: the sender (a worker's outbox) keeps the request and sends it again, and writes resume by
    themselves once there is space. Background loops skip the round (write_refusals.py has said it once)."""

    def __init__(self, reason: str):
        super().__init__(503, f"the coordinator's ledger database refuses writes ({reason}); nothing was stored, "
                         "send it again later", "store_full", retry_after_s=STORE_FULL_RETRY_AFTER_S)
        self.reason = reason
