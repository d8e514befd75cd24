"""`farworker generate`: one generation through the mesh, vouched for with signed receipts (exit codes here)."""

from __future__ import annotations

import sys
from pathlib import Path

from farworker.api_client import CoordinatorError
from farworker.config import EX_CONFIG
from farworker.mesh_client import MeshError
from farworker.process_tree import end_children
from farworker.receipts import ClientKeyError, load_or_create
from farworker.vouching_client import VouchingClient

EX_UNAVAILABLE = 69  # the mesh could not serve
EX_TEMPFAIL = 75  # served, but the receipts did not reach the coordinator


def run_generate(coordinator_url: str, key_file: str, initial_peers: str, model_path: str, model_name: str | None,
                 max_tokens: int, temperature: float, prompt: str) -> int:
    try:
        key = load_or_create(key_file)
    except ClientKeyError as err:
        print(f"--key: {err}", file=sys.stderr)
        return EX_CONFIG
    peers = [p for p in initial_peers.replace(",", " ").split() if p]
    if not peers:
        print("--initial-peers: at least one mesh multiaddr is required", file=sys.stderr)
        return EX_CONFIG
    client = VouchingClient(Path(model_path), peers, model_name or Path(model_path).name, key, coordinator_url)
    try:
        result = client.generate(prompt, max_tokens, temperature)
    except MeshError as err:
        print(f"the mesh could not serve: {err}", file=sys.stderr)
        return EX_CONFIG if err.status == 400 else EX_UNAVAILABLE
    except CoordinatorError as err:
        print(f"receipts not delivered: {err}", file=sys.stderr)
        return EX_TEMPFAIL
    finally:
        client.close()
        end_children(timeout=5.0)  # the petals client's DHT process and p2pd; then their /dev/shm files go
    generation = result.generation
    print(generation.text if generation.text is not None else " ".join(map(str, generation.completion_ids)))
    print(f"{len(result.accepted)} of {len(result.receipts)} receipts counted by the coordinator "
          f"(key {key.key_id})", file=sys.stderr)
    return 0
