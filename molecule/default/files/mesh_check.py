"""Molecule's mesh check: generate through the workers' blocks and compare with farworker.local_reference.

Runs with the farworker venv's python on the bootstrap container. Prints one JSON line: the greedy new tokens
from the mesh and from local transformers, the servers the client was routed through, and a ~40 MB forward pass.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from farworker.local_reference import generate_locally
from farworker.petals.compat import import_petals
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", required=True)
    parser.add_argument("--cache", default="/var/tmp/mesh-client")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--forward-mb", type=float, default=40.0)
    args = parser.parse_args()

    checkpoint = ensure_tiny_checkpoint(Path(args.cache))
    petals = import_petals()

    torch.manual_seed(7)
    prompt = torch.randint(3, 500, (1, 8))
    expected = generate_locally(str(checkpoint), prompt[0].tolist(), args.new_tokens)

    model = petals.AutoDistributedModelForCausalLM.from_pretrained(
        str(checkpoint),
        initial_peers=args.initial_peers.split(","),
        dht_prefix=TINY_MODEL_NAME,
        torch_dtype=torch.float32,
    )
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)

    blocks = model.transformer.h
    servers = {str(peer) for info in blocks.sequence_manager.state.sequence_info.block_infos for peer in info.servers}

    # A forward pass whose activations are tens of MB: goes through the servers' /dev/shm.
    hidden = model.config.hidden_size
    seq = 256
    batch = max(1, int(args.forward_mb * 1e6 / (4 * hidden * seq)))
    activations = torch.randn(batch, seq, hidden)
    with torch.no_grad():
        out = blocks(activations)

    print(json.dumps({
        "expected": expected,
        "got": got[0, prompt.shape[1]:].tolist(),
        "servers": sorted(servers),
        "forward_mb": activations.numel() * 4 / 1e6,
        "forward_shape": list(out.shape),
        "forward_finite": bool(torch.isfinite(out).all()),
    }))


if __name__ == "__main__":
    main()
