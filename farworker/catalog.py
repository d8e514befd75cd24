"""The model catalogue: which models a worker serves, their shapes, which are gated, their disk sizes, and the DHT
prefix clients find each one's blocks under. Everything else asks here.

Imports nothing (no torch, no petals): the configuration, `check`, the worker and the coordinator all read it.
"""

from __future__ import annotations

import re
from pathlib import Path

# The seed's supported distributed models. Anything else needs --allow-local-model and a directory.
SUPPORTED_MODELS = (
    "meta-llama/Llama-2-7b-chat-hf",
    "meta-llama/Llama-2-13b-chat-hf",
    "meta-llama/Llama-2-70b-chat-hf",
)
# Their shapes, so `check` can size the blocks before anything is downloaded: the num_hidden_layers,
# hidden_size, intermediate_size, num_attention_heads, num_key_value_heads and vocab_size of each model's
# config.json on the Hugging Face hub (meta-llama/Llama-2-{7b,13b,70b}-chat-hf).
SUPPORTED_MODEL_SHAPES: dict[str, dict[str, int]] = {
    "meta-llama/Llama-2-7b-chat-hf": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "meta-llama/Llama-2-13b-chat-hf": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824,
                                           num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "meta-llama/Llama-2-70b-chat-hf": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                           num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
# Bytes of each model's files in the cache (its float16 safetensors), what `check` expects a download to take.
MODEL_DISK_BYTES: dict[str, int] = {
    "meta-llama/Llama-2-7b-chat-hf": 14 * 10**9,
    "meta-llama/Llama-2-13b-chat-hf": 27 * 10**9,
    "meta-llama/Llama-2-70b-chat-hf": 140 * 10**9,
}
# Repositories the hub gates (a token with accepted terms is needed): refused early without HF_TOKEN.
GATED_MODEL_PREFIXES = ("meta-llama/",)
TINY_MODEL_NAME = "farworker-tiny-llama"  # built locally from a fixed seed; see tiny_model.py


def is_gated(model_name: str) -> bool:
    return model_name.startswith(GATED_MODEL_PREFIXES)


def dht_prefix_for(model_name: str) -> str:
    """The DHT prefix clients look the blocks up by.

    Every model reaches petals as a directory (the tiny model, a local checkpoint, a downloaded hub
    snapshot), for which petals has no prefix of its own. Hub models get petals' rule for a repo name
    (last part, dots to dashes, '-hf' suffix), so clients find them where they expect; local checkpoints
    and the tiny model their sanitized directory name.
    """
    if model_name in SUPPORTED_MODELS:
        prefix = model_name.split("/")[-1].replace(".", "-")
        return prefix if prefix.endswith("-hf") else prefix + "-hf"
    return re.sub(r"[^A-Za-z0-9_-]", "-", Path(model_name).name) or "local-model"
