"""The checks a direct client's receipt passes before it vouches for traffic (docs/trust.md, "Direct traffic")."""

from __future__ import annotations

from farworker.coordinator.errors import ApiError
from farworker.receipts import public_key_from_b64, verifies


def check_receipts(receipts: list[dict], client_keys: dict[str, tuple[str, str]],
                   model_blocks: dict[str, int]) -> list[dict]:
    """The receipts, each from a registered client key, verified, for a served model and inside its blocks; the
    batch is refused whole, naming the first bad receipt."""
    for i, r in enumerate(receipts):
        registered = client_keys.get(r["client_key_id"])
        if registered is None:
            raise ApiError(403, f"receipts.{i}.client_key_id {r['client_key_id']} is not a client key registered "
                           "with this coordinator (--client-keys)", "unregistered_client",
                           f"receipts.{i}.client_key_id")
        if not verifies(r, public_key_from_b64(registered[1])):
            raise ApiError(401, f"receipts.{i}.signature does not verify with client key {registered[0]!r}: the "
                           "receipt was changed after signing, or signed by another key", "bad_signature",
                           f"receipts.{i}.signature")
        total = model_blocks.get(r["model"])
        if model_blocks and total is None:
            raise ApiError(400, f"receipts.{i}.model {r['model']!r} is not served by this mesh; it serves "
                           f"{', '.join(sorted(model_blocks))}", "unknown_model", f"receipts.{i}.model")
        if total and r["blocks"][1] > total:
            raise ApiError(422, f"receipts.{i}.blocks {r['blocks']} lies outside the model's {total} blocks",
                           "invalid_payload", f"receipts.{i}.blocks")
    return receipts
