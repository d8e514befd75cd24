"""ApiError: a refusal a rule raises (status, one-line message, code, offending field); http.py answers it."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.field = status, message, code, field
