"""The error body every non-OpenAI route answers with."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="one line: what is wrong and what is accepted")
    field: str | None = Field(default=None, description="the offending field, dotted (records.0.tokens)")
    code: str | None = Field(
        default=None,
        description="bad_signature, replay, unregistered, forbidden, "
        "unknown_worker, invalid_payload, body_too_large, no_model, mesh_unavailable, rate_limited, not_allowed, "
        "too_many_unproven, invalid_query, invalid_cursor",
    )
    detail: list[dict] | None = Field(default=None, description="every invalid field, for 422")
