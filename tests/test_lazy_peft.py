"""petals' server backends are built without importing bitsandbytes, and int8 and adapters still work.

Each case runs in a fresh interpreter: what is imported is the point, and this test process may have imported
anything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Builds petals' TransformerBackend around block 0 of the tiny model (as petals' ModuleContainer does), runs one
# forward through it and prints what was imported on the way.
SCRIPT = textwrap.dedent("""
    import json, sys
    from farworker.petals.compat import import_petals
    from farworker.petals import lazy_peft
    import_petals()
    if {install}:
        lazy_peft.install()
    import torch
    from hivemind import BatchTensorDescriptor
    from petals.server.backend import TransformerBackend
    from petals.server.from_pretrained import load_pretrained_block
    from petals.server.memory_cache import MemoryCache
    from petals.utils.auto_config import AutoDistributedConfig
    from petals.utils.convert_block import QuantType, convert_block

    model = sys.argv[1]
    config = AutoDistributedConfig.from_pretrained(model)
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, config.hidden_size)
    plain = load_pretrained_block(model, 0, config=config, torch_dtype=torch.float32)
    expected = plain(hidden)[0]
    block = convert_block(load_pretrained_block(model, 0, config=config, torch_dtype=torch.float32), 0, config,
                          [torch.device("cpu")], torch.device("cpu"), QuantType.{quant})
    schema = (BatchTensorDescriptor(1, 2048, config.hidden_size, dtype=torch.float32),)
    backend = TransformerBackend("tiny.0", block, config=config, memory_cache=MemoryCache(2**20),
                                 backend_dtype=torch.float32, max_chunk_size_bytes=2**28, args_schema=schema,
                                 kwargs_schema={{}}, outputs_schema=schema, min_batch_size=1, max_batch_size=2048)
    out = backend.forward(hidden, "")[0]
    after_forward = "bitsandbytes" in sys.modules
    {after}
    print(json.dumps({{"bitsandbytes_after_forward": after_forward,
                      "max_error": float((out - expected).abs().max()), "extra": extra}}))
""")

NOTHING_MORE = "extra = None"
# An adapter's code path: petals' LoRA helpers are imported (the real module loads), and from then on the
# backend's using_adapter is petals' own, which LoRA layers read.
ADAPTER_PATH = textwrap.dedent("""
    from petals.utils.peft import AdapterContextMixin, create_lora_adapter
    with backend._peft_module.using_adapter("my-adapter"):
        extra = {"seen_by_lora_layers": AdapterContextMixin._context_active_adapter,
                 "module_is_petals_own": sys.modules["petals.utils.peft"].__name__ == "petals.utils.peft"
                                         and hasattr(sys.modules["petals.utils.peft"], "LoraLinear")}
""")


def run_case(tiny_model, *, install: bool, quant: str = "NONE", after: str = NOTHING_MORE) -> dict:
    script = SCRIPT.format(install=install, quant=quant, after=after)
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_backend_without_adapters_runs_without_bitsandbytes(tiny_model):
    result = run_case(tiny_model, install=True)
    assert result["bitsandbytes_after_forward"] is False
    assert result["max_error"] == 0.0


def test_petals_alone_imports_bitsandbytes_for_every_backend(tiny_model):
    """What the stand-in saves: without it, building a backend imports bitsandbytes (so the test above can fail)."""
    assert run_case(tiny_model, install=False)["bitsandbytes_after_forward"] is True


def test_int8_still_quantizes_with_the_stand_in(tiny_model):
    result = run_case(tiny_model, install=True, quant="INT8")
    assert result["bitsandbytes_after_forward"] is True  # petals' quantize_module imports it itself
    assert 0.0 < result["max_error"] < 0.1  # quantized: close to float32, not equal


@pytest.mark.parametrize("install", [True, False])
def test_adapters_get_petals_own_module(tiny_model, install):
    extra = run_case(tiny_model, install=install, after=ADAPTER_PATH)["extra"]
    assert extra == {"seen_by_lora_layers": "my-adapter", "module_is_petals_own": True}
