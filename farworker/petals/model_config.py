"""A model's block configuration and a block's size, as petals reads and computes them.

The block plan (`run`) and the preflight (`check`) size blocks before any weight is loaded; they ask here, so
neither imports petals itself. petals is imported on the first call (through compat), not at import.
"""

from __future__ import annotations

import contextlib

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
    from petals.server import block_utils
    from petals.utils.convert_block import QuantType

    with _buffers_built_on_cpu(block_utils):
        return block_utils.get_block_size(block_config, "memory", dtype=dtype, quant_type=QuantType[quant_type.upper()])


@contextlib.contextmanager
def _buffers_built_on_cpu(block_utils):
    """petals' get_block_size builds an empty block with ``init_empty_weights(include_buffers=True)``, so the rotary
    embedding computes its small buffers on the meta device; that arithmetic goes through torch's Python reference
    ops, whose first call imports torch._dynamo (0.5-1 s of CPU on every worker start, for nothing). It counts only
    the parameters, which stay on the meta device here; the buffers (kilobytes to a few MB) are computed on the CPU.
    """
    from accelerate import init_empty_weights

    def params_only(include_buffers=None):
        return init_empty_weights(include_buffers=False)

    original = block_utils.init_empty_weights
    block_utils.init_empty_weights = params_only  # called from the main thread while the plan is made; undone below
    try:
        yield
    finally:
        block_utils.init_empty_weights = original
