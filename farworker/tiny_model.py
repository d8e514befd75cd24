"""The embedded default model: a tiny Llama checkpoint made deterministically on first use.

No hub download: the weights come from a fixed seed, so every machine builds the same bytes and a
private mesh (demo, tests, container checks) can compare mesh output with local transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_MODEL_NAME = "farworker-tiny-llama"
TINY_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}
_SEED = 20261126
_MARKER = "farworker-tiny.json"


def default_cache_root() -> Path:
    return Path(os.environ.get("FARWORKER_CACHE_ROOT", Path.home() / ".cache" / "farworker"))


def ensure_tiny_checkpoint(root: Path | None = None) -> Path:
    """Return the directory of the tiny checkpoint, building it once (atomically) if missing."""
    directory = (root or default_cache_root()) / TINY_MODEL_NAME
    if (directory / _MARKER).is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(_SEED)
    config = LlamaConfig(**TINY_CONFIG, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / _MARKER).write_text(json.dumps({"seed": _SEED, **TINY_CONFIG}))
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(directory)
    except OSError:  # another process built it first; theirs is byte-identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return directory
