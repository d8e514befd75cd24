"""The auto block count and the CPU rules, on the real Llama-2 configurations' shapes."""

import pytest
import torch
from transformers import LlamaConfig

from farworker.block_plan import GIB, auto_num_blocks, per_block_bytes, plan_blocks
from farworker.config import ConfigError, load_config
from farworker.petals.compat import import_petals

LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)
LLAMA_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000)
BASE = {"FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20, "FARLABS_NEW_SWARM": "true",
        "FARLABS_API_BASE_URL": "http://127.0.0.1:9"}


@pytest.fixture(scope="module", autouse=True)
def _petals():
    import_petals()


def block_config(config):
    from petals.models.llama import DistributedLlamaConfig

    return DistributedLlamaConfig(**config.to_dict())


def test_per_block_bytes_of_llama_7b():
    config = block_config(LLAMA_7B)
    fp16 = per_block_bytes(config, torch.float16, "none")
    nf4 = per_block_bytes(config, torch.float16, "nf4")
    cache = 2 * 4096 * 4096 * 2  # K and V for 4096 tokens in fp16
    assert fp16 == pytest.approx(202_383_360 * 2 + cache, rel=0.02)  # ~202M weights per block
    assert cache < nf4 < fp16 / 2


def test_auto_count_leaves_a_reserve_and_caps_at_the_model():
    per_block = 700 * 2**20
    # 16 GiB free, 7B-shaped (hidden 4096): reserve = 1 GiB + 2 GiB * 4096/14336
    expected = int((16 * GIB - GIB - 2 * GIB * 4096 / 14336) // per_block)
    assert expected == 21
    assert auto_num_blocks(16 * GIB, per_block, 4096, 32) == expected
    assert auto_num_blocks(200 * GIB, per_block, 4096, 32) == 32
    assert auto_num_blocks(GIB, per_block, 4096, 32) < 1


def test_cpu_needs_an_explicit_count_for_a_large_model():
    config = load_config({**BASE, "FARLABS_DEVICE": "cpu", "FARLABS_TORCH_DTYPE": "float32"})
    with pytest.raises(ConfigError, match="FARLABS_NUM_BLOCKS=auto needs a GPU"):
        plan_blocks(config, block_config(LLAMA_70B))
    fixed = load_config({**BASE, "FARLABS_DEVICE": "cpu", "FARLABS_TORCH_DTYPE": "float32", "FARLABS_NUM_BLOCKS": "3"})
    assert plan_blocks(fixed, block_config(LLAMA_70B)).num_blocks == 3


def test_cpu_rejects_float16_and_quantization():
    config = load_config({**BASE, "FARLABS_DEVICE": "cpu", "FARLABS_QUANT_TYPE": "nf4", "FARLABS_NUM_BLOCKS": "1"})
    with pytest.raises(ConfigError) as caught:
        plan_blocks(config, block_config(LLAMA_7B))
    assert [p.split("=")[0] for p in caught.value.problems] == ["FARLABS_TORCH_DTYPE", "FARLABS_QUANT_TYPE"]


def test_block_indices_beyond_the_model_are_refused():
    config = load_config({**BASE, "FARLABS_DEVICE": "cpu", "FARLABS_TORCH_DTYPE": "float32",
                          "FARLABS_BLOCK_INDICES": "30:40"})
    with pytest.raises(ConfigError, match="expected end <= 32"):
        plan_blocks(config, block_config(LLAMA_7B))
