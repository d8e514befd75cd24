"""petals' server backends are built without importing bitsandbytes, and int8 and adapters still work.

Each case runs in a fresh interpreter: what is imported is the point, and this test process may have imported
anything already. One interpreter per case walks all three paths in order (no adapter, int8, an adapter's code).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Builds petals' TransformerBackend around block 0 of the tiny model (as petals' ModuleContainer does), runs one
# forward through it, and says what was imported on the way.
SCRIPT = textwrap.dedent("""
    import json, sys
    from farworker.petals.compat import import_petals
    from farworker.petals import lazy_peft
    import_petals()
    if sys.argv[2] == "install":
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
    expected = load_pretrained_block(model, 0, config=config, torch_dtype=torch.float32)(hidden)[0]
    schema = (BatchTensorDescriptor(1, 2048, config.hidden_size, dtype=torch.float32),)

    def backend_error(quant):
        block = convert_block(load_pretrained_block(model, 0, config=config, torch_dtype=torch.float32), 0, config,
                              [torch.device("cpu")], torch.device("cpu"), quant)
        backend = TransformerBackend(f"tiny.{quant.name}", block, config=config, memory_cache=MemoryCache(2**20),
                                     backend_dtype=torch.float32, max_chunk_size_bytes=2**28, args_schema=schema,
                                     kwargs_schema={}, outputs_schema=schema, min_batch_size=1, max_batch_size=2048)
        return backend, float((backend.forward(hidden, "")[0] - expected).abs().max())

    result = {}
    backend, result["none_error"] = backend_error(QuantType.NONE)
    result["bitsandbytes_after_none"] = "bitsandbytes" in sys.modules
    _, result["int8_error"] = backend_error(QuantType.INT8)
    result["bitsandbytes_after_int8"] = "bitsandbytes" in sys.modules
    # an adapter's code path: petals' LoRA helpers are imported (the real module loads), and from then on the
    # backend's using_adapter is petals' own, which LoRA layers read
    from petals.utils.peft import AdapterContextMixin, create_lora_adapter  # noqa: F401
    with backend._peft_module.using_adapter("my-adapter"):
        result["seen_by_lora_layers"] = AdapterContextMixin._context_active_adapter
    result["module_is_petals_own"] = hasattr(sys.modules["petals.utils.peft"], "LoraLinear")
    print(json.dumps(result))
""")


def run_case(tiny_model, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model), mode], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["install", "petals alone"])
def test_backends_without_adapters_skip_bitsandbytes_and_int8_and_adapters_still_work(tiny_model, mode):
    result = run_case(tiny_model, mode)
    # petals alone imports bitsandbytes for every backend: that case shows this test can fail
    assert result["bitsandbytes_after_none"] is (mode != "install")
    assert result["none_error"] == 0.0
    assert result["bitsandbytes_after_int8"] is True  # petals' quantize_module imports it itself
    assert 0.0 < result["int8_error"] < 0.1  # quantized: close to float32, not equal
    assert result["seen_by_lora_layers"] == "my-adapter" and result["module_is_petals_own"]
