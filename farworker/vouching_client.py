"""Generate through the mesh directly (no coordinator in the data path) and vouch for what the workers served.

The generation is the coordinator's own client path (``farworker.mesh_client.MeshClient``); each server
session of its route becomes a receipt signed with the client's key (``farworker.receipts``), posted to the
coordinator's ``POST /v1/receipts``. That is what pays the workers for direct traffic (docs/trust.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import requests

from farworker import __version__
from farworker.api_client import CoordinatorError
from farworker.catalog import dht_prefix_for
from farworker.mesh_client import Generation, MeshClient
from farworker.receipts import ClientKey, receipts_for


@dataclass
class VouchedGeneration:
    generation: Generation
    receipts: list[dict]
    accepted: list[str]  # receipt ids the coordinator counts


def post_receipts(coordinator_url: str, receipts: list[dict], timeout: float = 10.0) -> dict:
    """POST signed receipts; the coordinator's answer ({"accepted", "duplicates"}) or CoordinatorError."""
    url = coordinator_url.rstrip("/") + "/v1/receipts"
    try:
        answer = requests.post(url, json={"receipts": receipts}, timeout=timeout,
                               headers={"User-Agent": f"farworker/{__version__}"})
    except requests.RequestException as err:
        raise CoordinatorError(f"POST /v1/receipts: no answer from {coordinator_url}: {err}") from None
    if answer.status_code != 200:
        try:
            body = answer.json()
            message, code = body.get("error") or answer.text, body.get("code")
        except ValueError:
            message, code = answer.text[:200], None
        raise CoordinatorError(f"POST /v1/receipts: HTTP {answer.status_code}: {message}", answer.status_code, code)
    return answer.json()


class VouchingClient:
    """A direct mesh client that files a signed receipt for every server session it used."""

    def __init__(self, model_path: Path, initial_peers: list[str], model_name: str, key: ClientKey,
                 coordinator_url: str, dht_prefix: str | None = None, **client_options):
        self.model_name, self.key, self.coordinator_url = model_name, key, coordinator_url
        self.mesh = MeshClient(model_path, initial_peers, dht_prefix or dht_prefix_for(model_name), **client_options)

    def generate(self, prompt: str | list[int], max_tokens: int = 16, temperature: float = 0.0,
                 **options) -> VouchedGeneration:
        """Generate, then post one receipt per server session. Receipts that cannot be delivered raise
        CoordinatorError after the generation (its ``receipts`` are on the exception to retry later)."""
        generation = self.mesh.generate(prompt, max_tokens, temperature, **options)
        receipts = receipts_for(generation.route, self.model_name, self.key)
        if not receipts:
            return VouchedGeneration(generation, [], [])
        try:
            answer = post_receipts(self.coordinator_url, receipts)
        except CoordinatorError as err:
            err.receipts = receipts
            raise
        return VouchedGeneration(generation, receipts, list(answer["accepted"]))

    def close(self) -> None:
        self.mesh.close()
