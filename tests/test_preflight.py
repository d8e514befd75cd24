"""`farworker check` item by item, in process: block sizing from block_plan, GPU lists given, real sockets."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from farworker import preflight
from farworker.block_plan import auto_num_blocks, per_block_bytes
from farworker.catalog import SUPPORTED_MODEL_SHAPES, SUPPORTED_MODELS
from farworker.config import load_config
from farworker.gpu import NvmlGpu
from farworker.model_source import repo_cache_dir
from farworker.petals.compat import import_petals

PEER = "QmYAM6qwoBS2ET8sW9DyZLiJK4Y6Ye2nAepQCiXfqxsX8v"
GB = 10**9
LLAMA_7B, LLAMA_13B, LLAMA_70B = SUPPORTED_MODELS
# Parameter counts Meta published for Llama 2 (the "7B", "13B" and "70B" of the model cards, exactly)
PUBLISHED_PARAMETERS = {LLAMA_7B: 6_738_415_616, LLAMA_13B: 13_015_864_320, LLAMA_70B: 68_976_648_192}


def llama_config(**shape):
    import_petals()
    from petals.models.llama import DistributedLlamaConfig

    return DistributedLlamaConfig(**shape)


def gpu(total: float, free: float, index: int = 0) -> NvmlGpu:
    return NvmlGpu(index, "Test GPU", f"GPU-test-{index}", int(total), int(free))


def config_for(tmp_path, **env):
    return load_config(
        {
            "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20,
            "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
            "FARLABS_DHT_BOOTSTRAP": f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}",
            "FARLABS_CACHE_DIR": str(tmp_path / "cache"),
            **env,
        }
    )


def expected_auto(block_config, free: int, dtype=torch.float16, quant="nf4") -> int:
    per_block = per_block_bytes(block_config, dtype, quant)
    return auto_num_blocks(free, per_block, block_config.hidden_size, block_config.num_hidden_layers)


@pytest.mark.parametrize("model", SUPPORTED_MODELS)
def test_known_shapes_give_the_published_parameter_counts(model):
    block_config = llama_config(**SUPPORTED_MODEL_SHAPES[model])
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        block = block_config.block_class(block_config)
    per_block = sum(p.numel() for p in block.parameters())
    embeddings_and_head = 2 * block_config.vocab_size * block_config.hidden_size + block_config.hidden_size
    assert block_config.num_hidden_layers * per_block + embeddings_and_head == PUBLISHED_PARAMETERS[model]


@pytest.mark.parametrize(("model", "free"), [(LLAMA_7B, 3 * GB), (LLAMA_13B, 5 * GB), (LLAMA_70B, 22 * GB)])
def test_allowlisted_model_is_sized_from_free_vram_without_download(tmp_path, model, free):
    block_config = llama_config(**SUPPORTED_MODEL_SHAPES[model])
    expected = expected_auto(block_config, free)
    layers = block_config.num_hidden_layers
    assert 0 < expected < layers  # a figure where the free VRAM, not the model, decides

    result = preflight.check_vram(config_for(tmp_path, FARLABS_MODEL_NAME=model), [gpu(24 * GB, free)])
    assert result.level == "OK", result.line()
    assert f"would serve {expected} of {layers} blocks" in result.detail
    assert "known shape" in result.detail


def test_config_json_in_the_cache_wins_over_the_known_shape(tmp_path):
    shape = {**SUPPORTED_MODEL_SHAPES[LLAMA_7B], "num_hidden_layers": 6}
    snapshot = repo_cache_dir(tmp_path / "cache", LLAMA_7B) / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **shape})
    )
    expected = expected_auto(llama_config(**shape), 24 * GB)

    result = preflight.check_vram(config_for(tmp_path, FARLABS_MODEL_NAME=LLAMA_7B), [gpu(24 * GB, 24 * GB)])
    assert f"would serve {expected} of 6 blocks" in result.detail, result.line()
    assert str(snapshot / "config.json") in result.detail


def test_vram_below_the_8_gb_minimum_is_flagged(tmp_path):
    free = int(5.5 * GB)
    expected = expected_auto(llama_config(**SUPPORTED_MODEL_SHAPES[LLAMA_7B]), free)

    result = preflight.check_vram(config_for(tmp_path), [gpu(6 * GB, free)])
    assert result.level == "WARN", result.line()
    assert "below the 8 GB minimum" in result.detail
    assert f"would serve {expected} of 32 blocks" in result.detail
    assert preflight.check_vram(config_for(tmp_path), [gpu(8 * GB, free)]).level == "OK"


def test_not_one_block_in_free_vram_fails(tmp_path):
    free = int(1.5 * GB)
    assert expected_auto(llama_config(**SUPPORTED_MODEL_SHAPES[LLAMA_70B]), free) < 1

    result = preflight.check_vram(config_for(tmp_path, FARLABS_MODEL_NAME=LLAMA_70B), [gpu(24 * GB, free)])
    assert result.level == "FAIL" and "not one block fits" in result.detail, result.line()


def test_cpu_host_without_num_blocks_is_told_what_to_set(tmp_path):
    result = preflight.check_vram(config_for(tmp_path, FARLABS_DEVICE="cpu"), [])
    assert result.level == "FAIL", result.line()
    assert "FARLABS_NUM_BLOCKS" in result.detail and "32 blocks" in result.detail

    given = preflight.check_vram(config_for(tmp_path, FARLABS_DEVICE="cpu", FARLABS_NUM_BLOCKS="6"), [])
    assert given.level == "OK" and "would serve 6 blocks" in given.detail, given.line()
    tiny = preflight.check_vram(
        config_for(
            tmp_path, FARLABS_DEVICE="cpu", FARLABS_MODEL_NAME="farworker-tiny-llama", FARLABS_TORCH_DTYPE="float32"
        ),
        [],
    )
    assert tiny.level == "OK" and "would serve all 4 blocks on CPU" in tiny.detail, tiny.line()


def test_device_naming_a_gpu_nvml_does_not_list_fails(tmp_path):
    result = preflight.check_vram(config_for(tmp_path, FARLABS_DEVICE="cuda:1"), [gpu(24 * GB, 20 * GB)])
    assert result.level == "FAIL" and "cuda:1" in result.detail
    other = preflight.check_vram(
        config_for(tmp_path, FARLABS_DEVICE="cuda:1"), [gpu(24 * GB, 20 * GB), gpu(80 * GB, 3 * GB, index=1)]
    )
    expected = expected_auto(llama_config(**SUPPORTED_MODEL_SHAPES[LLAMA_7B]), 3 * GB)
    assert f"on GPU 1; would serve {expected} of 32 blocks" in other.detail, other.line()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def listening_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def http_api():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_unreachable_api_is_a_warning_because_run_keeps_serving(tmp_path, http_api):
    down = preflight.check_api_and_clock(config_for(tmp_path, FARLABS_API_BASE_URL=f"http://127.0.0.1:{closed_port()}"))[0]
    assert down.level == "WARN", down.line()
    assert "outbox" in down.detail and "retries" in down.detail

    malformed = preflight.check_api_and_clock(config_for(tmp_path, FARLABS_API_BASE_URL="http://127.0.0.1:99999"))[0]
    assert malformed.level == "FAIL" and "FARLABS_API_BASE_URL" in malformed.detail, malformed.line()

    up = preflight.check_api_and_clock(config_for(tmp_path, FARLABS_API_BASE_URL=http_api))[0]
    assert up.level == "OK" and "HTTP 200" in up.detail, up.line()


def test_bootstrap_peers_unreachable_fail_because_run_cannot_join(tmp_path, listening_port):
    def check(*ports_or_maddrs):
        maddrs = [p if isinstance(p, str) else f"/ip4/127.0.0.1/tcp/{p}/p2p/{PEER}" for p in ports_or_maddrs]
        return preflight.check_bootstrap(config_for(tmp_path, FARLABS_DHT_BOOTSTRAP=",".join(maddrs)))

    assert check(listening_port).line().startswith("OK   bootstrap peers: 1 of 1 reachable")
    assert check(listening_port, closed_port()).level == "WARN"
    assert check(closed_port()).line().startswith("FAIL bootstrap peers: 0 of 1 reachable")
    quic = check(f"/ip4/127.0.0.1/udp/{closed_port()}/quic/p2p/{PEER}")
    assert quic.level == "WARN" and "not checked" in quic.detail, quic.line()


# --- the driver against what runs on it (issue: driver/CUDA mismatches after upgrades) --------------------
def _driver(version="580.65.06", cuda="13.0"):
    from farworker.gpu import DriverInfo

    return DriverInfo(version, cuda)


def _levels(results) -> dict[str, str]:
    return {r.item: r.level for r in results}


def test_a_driver_too_old_for_torchs_cuda_fails_naming_the_branch():
    from farworker.preflight import driver_stack_results

    results = driver_stack_results(_driver("550.54.15", "12.4"), "13.0", "550.54.15", {0: True})
    assert _levels(results) == {"driver vs CUDA": "FAIL", "kernel module": "OK", "persistence mode": "OK"}
    assert "branch 580 or newer" in results[0].detail and "CUDA 12.4" in results[0].detail
    ok = driver_stack_results(_driver(), "13.0", "580.65.06", {0: True, 1: True})
    assert all(r.level == "OK" for r in ok), ok
    assert "driver vs CUDA" not in _levels(driver_stack_results(_driver(), None, "580.65.06", {}))  # CPU torch


def test_a_kernel_module_other_than_the_library_is_the_version_mismatch():
    from farworker.preflight import driver_stack_results

    results = driver_stack_results(_driver("580.82.07"), "13.0", "580.65.06", {0: True})
    mismatch = next(r for r in results if r.item == "kernel module")
    assert mismatch.level == "FAIL" and "Driver/library version mismatch" in mismatch.detail
    assert _levels(driver_stack_results(_driver(), "13.0", None, {}))["kernel module"] == "WARN"


def test_persistence_mode_off_is_a_warning_naming_the_gpus():
    from farworker.preflight import driver_stack_results

    results = driver_stack_results(_driver(), "13.0", "580.65.06", {0: True, 1: False, 3: False})
    off = next(r for r in results if r.item == "persistence mode")
    assert off.level == "WARN" and "GPU 1, 3" in off.detail


def test_the_kernel_module_version_is_read_from_both_module_flavours(tmp_path):
    from farworker.gpu import kernel_module_version

    proprietary = tmp_path / "proprietary"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    open_module = tmp_path / "open"
    open_module.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    assert kernel_module_version(str(proprietary)) == "550.54.15"
    assert kernel_module_version(str(open_module)) == "580.65.06"
    assert kernel_module_version(str(tmp_path / "missing")) is None


# -- a CUDA build of torch with no GPU visible (the CUDA image started without --gpus all) --------------------
# This machine's torch is the CPU build and it has no NVIDIA driver: the one stand-in is torch.version.cuda, set
# before farworker runs, in a real `farworker check` / `farworker run` process. NVML and torch.cuda answer for real.
NO_GPU_LINE = "no GPU visible: run with --gpus all (NVIDIA Container Toolkit)"
AS_CUDA_BUILD = ("import sys, torch; torch.version.cuda = '13.0'; sys.argv[0] = 'farworker'; "
                 "from farworker.cli import main; main()")


def farworker_as_cuda_build(tmp_path, *args, **env):
    import subprocess
    import sys

    from farworker.local_mesh import base_env

    return subprocess.run([sys.executable, "-c", AS_CUDA_BUILD, *args], capture_output=True, text=True, timeout=180,
                          env=base_env({
                              "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20, "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
                              "FARLABS_NEW_SWARM": "true", "FARLABS_MODEL_NAME": "farworker-tiny-llama",
                              "FARLABS_TORCH_DTYPE": "float32", "FARLABS_CACHE_DIR": str(tmp_path / "cache"),
                              "FARLABS_STATE_DIR": str(tmp_path / "state"), **env}))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_cuda_build_without_a_gpu_refuses_to_run_with_exit_78(tmp_path, device):
    result = farworker_as_cuda_build(tmp_path, "run", FARLABS_DEVICE=device)
    assert result.returncode == 78, result.stdout + result.stderr[-3000:]
    assert f"config error: {NO_GPU_LINE}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "identity.key").exists()  # refused before anything started


@pytest.mark.slow
def test_check_on_a_cuda_build_without_a_gpu_fails_with_the_same_line(tmp_path):
    result = farworker_as_cuda_build(tmp_path, "check", FARLABS_DEVICE="cuda")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if line.startswith(f"FAIL GPU: {NO_GPU_LINE}")], result.stdout


@pytest.mark.parametrize(("device", "pinned"), [("cpu", ""), ("auto", "cpu")])
def test_a_cuda_build_asked_for_the_cpu_is_not_refused(monkeypatch, device, pinned):
    from farworker import gpu as gpu_module

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert gpu_module.cuda_build_without_gpu(device, pinned) is None
    assert gpu_module.cuda_build_without_gpu("auto", "").startswith(NO_GPU_LINE)  # the same process, asking for one


def test_a_cpu_build_of_torch_is_never_refused():
    from farworker import gpu as gpu_module

    assert torch.version.cuda is None  # this machine's torch; the CPU tests and CPU workers run it
    assert gpu_module.cuda_build_without_gpu("auto", "") is None
