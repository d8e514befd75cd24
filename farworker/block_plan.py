"""Which blocks to serve, on which device, in which format: decided before any weight is loaded.

Auto block count on a GPU (FARLABS_NUM_BLOCKS=auto):

    per_block   = block weights (dtype, quantization)
                  + attention cache (2 * hidden * 4096 tokens / kv groups * dtype bytes)
    reserve     = 1 GiB (CUDA context, allocator slack) + petals' backward estimate (2 GiB * hidden / 14336)
    num_blocks  = min(model blocks, floor((free VRAM - reserve) / per_block))

Free VRAM comes from NVML at start, so memory other processes hold is respected. On CPU the operator
gives FARLABS_NUM_BLOCKS or FARLABS_BLOCK_INDICES; a model small enough (under 1 GiB of weights) is
served whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from farworker import gpu
from farworker.config import ConfigError, WorkerConfig
from farworker.petals.model_config import block_weight_bytes

GIB = 1024**3
ATTN_CACHE_TOKENS = 4096  # petals' default for multi-head attention
CPU_WHOLE_MODEL_LIMIT = 1 * GIB


@dataclass(frozen=True)
class BlockPlan:
    device: str
    quant_type: str  # petals QuantType name, lower case
    num_blocks: int
    start: int | None = None  # fixed span when the operator gave FARLABS_BLOCK_INDICES
    end: int | None = None
    per_block_bytes: int = 0
    free_vram_bytes: int | None = None

    @property
    def fixed(self) -> bool:
        return self.start is not None


# torch is imported where it is used: `check --config-only` imports this module (through preflight) and must not
# pay seconds for torch to validate an env file.


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return "cuda:0"
    return requested


def per_block_bytes(block_config, dtype, quant_type) -> int:
    import torch

    weights = block_weight_bytes(block_config, dtype, quant_type)
    kv_groups = getattr(block_config, "num_key_value_groups", 1) or 1
    cache = 2 * block_config.hidden_size * ATTN_CACHE_TOKENS // kv_groups * torch.finfo(dtype).bits // 8
    return int(weights + cache)


def auto_num_blocks(free_vram: int, per_block: int, hidden_size: int, model_blocks: int) -> int:
    reserve = GIB + int(2 * GIB * hidden_size / 14336)
    return min(model_blocks, math.floor((free_vram - reserve) / per_block))


def auto_count(block_config, per_block: int, free_vram: int | None) -> int:
    """FARLABS_NUM_BLOCKS=auto: on a GPU (free_vram given) the blocks that fit; on CPU the whole model when
    it is small, else 0 (the operator must say how many)."""
    model_blocks = block_config.num_hidden_layers
    if free_vram is None:
        return model_blocks if per_block * model_blocks <= CPU_WHOLE_MODEL_LIMIT else 0
    return auto_num_blocks(free_vram, per_block, block_config.hidden_size, model_blocks)


def plan_blocks(config: WorkerConfig, block_config) -> BlockPlan:
    """Raises ConfigError (exit 78) when the request cannot be served on this host."""
    import torch

    device = resolve_device(config.device)
    dtype = getattr(torch, config.torch_dtype)
    model_blocks = block_config.num_hidden_layers
    problems = []
    if device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"FARLABS_DEVICE={config.device!r} is unavailable: torch sees no CUDA device; expected cpu")
    if device == "cpu" and config.torch_dtype == "float16":
        problems.append("FARLABS_TORCH_DTYPE='float16' is not supported on CPU: expected float32 or bfloat16")
    quant = config.quant_type
    if quant == "auto":
        quant = "nf4" if device.startswith("cuda") else "none"
    elif quant == "nf4" and device == "cpu":  # bitsandbytes 0.50 runs LLM.int8 on CPU; its 4-bit path wants CUDA
        problems.append(f"FARLABS_QUANT_TYPE={quant!r} needs a CUDA device: expected none, int8 or auto on CPU")
    if config.block_indices and config.block_indices[1] > model_blocks:
        problems.append(f"FARLABS_BLOCK_INDICES={config.block_indices[0]}:{config.block_indices[1]} is out of range: "
                        f"expected end <= {model_blocks} for {config.model_name}")
    if problems:
        raise ConfigError(problems)

    per_block = per_block_bytes(block_config, dtype, quant)
    if config.block_indices:
        start, end = config.block_indices
        return BlockPlan(device, quant, end - start, start, end, per_block)
    if config.num_blocks is not None:
        return _count(device, quant, config.num_blocks, model_blocks, per_block)
    if device == "cpu":
        if auto_count(block_config, per_block, None):
            return _count(device, quant, model_blocks, model_blocks, per_block)
        raise ConfigError(["FARLABS_NUM_BLOCKS=auto needs a GPU: expected a number of blocks (or "
                           "FARLABS_BLOCK_INDICES) when serving on CPU"])
    index = torch.device(device).index or 0
    gpus = {g.index: g for g in gpu.list_gpus()}
    free = gpus[index].memory_free_bytes if index in gpus else torch.cuda.mem_get_info(index)[0]
    count = auto_count(block_config, per_block, free)
    if count < 1:
        raise ConfigError([f"FARLABS_NUM_BLOCKS=auto found {free / GIB:.1f} GiB free VRAM on {device}: one block "
                           f"needs {per_block / GIB:.2f} GiB plus reserve; expected a GPU with more free memory"])
    return _count(device, quant, count, model_blocks, per_block, free)


def _count(device: str, quant: str, count: int, model_blocks: int, per_block: int, free: int | None = None):
    """A count of blocks; all of them is the fixed span 0:N. (Choosing a span makes petals first sleep
    a random 0-10 s so that servers started together pick different blocks: pointless for all blocks.)"""
    if count >= model_blocks:
        return BlockPlan(device, quant, model_blocks, 0, model_blocks, per_block, free)
    return BlockPlan(device, quant, count, per_block_bytes=per_block, free_vram_bytes=free)
