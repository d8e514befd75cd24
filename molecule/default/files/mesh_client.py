"""Molecule's mesh client: generate through the workers' blocks and compare with local transformers.

Runs with the farworker venv's python on the bootstrap container. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

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
    from transformers import LlamaForCausalLM

    torch.manual_seed(7)
    prompt = torch.randint(3, 500, (1, 8))
    local = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = local.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    del local

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
        "expected": expected[0].tolist(),
        "got": got[0].tolist(),
        "servers": sorted(servers),
        "forward_mb": activations.numel() * 4 / 1e6,
        "forward_shape": list(out.shape),
        "forward_finite": bool(torch.isfinite(out).all()),
    }))


if __name__ == "__main__":
    main()
