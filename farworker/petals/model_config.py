"""A model's block configuration and a block's size, as petals reads and computes them.

The block plan (`run`) and the preflight (`check`) size blocks before any weight is loaded; they ask here, so
neither imports petals itself. petals is imported on the first call (through compat), not at import.
"""

from __future__ import annotations

from farworker.petals.compat import import_petals


def block_config_from_pretrained(model_dir: str, token: str | None = None):
    """petals' distributed config of the checkpoint in ``model_dir`` (its config.json; no hub call for a directory)."""
    import_petals()
    from petals.utils.auto_config import AutoDistributedConfig

    return AutoDistributedConfig.from_pretrained(model_dir, use_auth_token=token)


def llama_block_config(**shape):
    """petals' Llama config of the given shape (num_hidden_layers, hidden_size, ...): a model known by its shape."""
    import_petals()
    from petals.models.llama import DistributedLlamaConfig

    return DistributedLlamaConfig(**shape)


def block_weight_bytes(block_config, dtype, quant_type: str) -> int:
    """Bytes one block's weights take in memory in ``dtype`` with quantization ``quant_type`` (none, int8, nf4)."""
    import_petals()
    from petals.server.block_utils import get_block_size
    from petals.utils.convert_block import QuantType

    return get_block_size(block_config, "memory", dtype=dtype, quant_type=QuantType[quant_type.upper()])
