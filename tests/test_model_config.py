"""A block's size is petals' own figure, computed without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from farworker.petals.compat import import_petals
from farworker.petals.model_config import block_weight_bytes, llama_block_config

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
}


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_weight_bytes_equal_petals_own_figure(shape, quant):
    import_petals()
    from petals.server.block_utils import get_block_size
    from petals.utils.convert_block import QuantType

    config = llama_block_config(**SHAPES[shape])
    expected = get_block_size(config, "memory", dtype=torch.float16, quant_type=QuantType[quant.upper()])
    assert block_weight_bytes(config, torch.float16, quant) == expected


def test_sizing_a_block_does_not_import_torch_dynamo():
    """torch._dynamo costs 0.5-1 s of CPU to import; a worker sizes its blocks on every start."""
    script = ("import sys, torch\n"
              "from farworker.petals.model_config import block_weight_bytes, llama_block_config\n"
              f"block_weight_bytes(llama_block_config(**{SHAPES['tiny']!r}), torch.float32, 'none')\n"
              "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
