"""The CUDA image, checked without a GPU (`scripts/ci-docker.sh cuda` builds it, then runs this).

Skipped unless FARWORKER_CUDA_IMAGE names the image and a docker daemon answers. What can be known here without
a GPU: torch is the CUDA 13 build, every library it links is in the image but the driver's, bitsandbytes carries
its CUDA 13.0 library, and without `--gpus all` both `farworker check` and `farworker run` say so in one line.
Serving on a GPU is left to a GPU host (docs/docker.md).

Network: none. Every container runs with `--network none`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

IMAGE = os.environ.get("FARWORKER_CUDA_IMAGE", "")
NO_GPU_LINE = "no GPU visible: run with --gpus all (NVIDIA Container Toolkit)"
PYTHON = "/opt/farworker/bin/python"
CONFIG = {  # valid, and nothing to reach: the checks that need the network warn or are skipped
    "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20,
    "FARLABS_NEW_SWARM": "true",
    "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
    "HF_HUB_OFFLINE": "1",
}


def _docker_available() -> bool:
    if not IMAGE or shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=30).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _docker_available(), reason="needs FARWORKER_CUDA_IMAGE, built, and a docker daemon"),
]


def in_image(*args: str, entrypoint: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    """`docker run --rm` of the image with no network and /dev/shm large enough for `run` (its own refusal)."""
    flags = ["--rm", "--network", "none", "--shm-size", "1g"]
    if entrypoint:
        flags += ["--entrypoint", entrypoint]
    for key, value in (env or {}).items():
        flags += ["-e", f"{key}={value}"]
    return subprocess.run(["docker", "run", *flags, IMAGE, *args], capture_output=True, text=True, timeout=timeout)


def python_in_image(code: str) -> str:
    result = in_image("-c", code, entrypoint=PYTHON)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_the_image_asks_the_container_toolkit_for_cuda_and_nvml():
    config = json.loads(subprocess.run(["docker", "image", "inspect", "-f", "{{json .Config}}", IMAGE],
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    assert config["Labels"]["farworker.torch-variant"] == "cuda"
    env = dict(item.split("=", 1) for item in config["Env"])
    # compute: libcuda from the host's driver; utility: NVML (telemetry, `farworker check`)
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}


def test_torch_is_the_cuda_13_build():
    version, cuda, available = python_in_image(
        "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())").split()
    assert version.split("+")[0] == "2.13.0" and "+cpu" not in version, version  # PyPI's says 2.13.0+cu130
    assert cuda.split(".")[0] == "13", cuda
    assert available == "False"  # no --gpus: nothing to see, and torch says so instead of failing


def test_every_library_torch_cuda_links_is_in_the_image_but_the_drivers():
    # The CUDA runtime, cuBLAS, cuDNN, NCCL ... come from the nvidia-* wheels (RPATHs into site-packages);
    # only libcuda (the driver) comes from the host, mounted by the NVIDIA Container Toolkit.
    lib = python_in_image("import pathlib, torch; print(pathlib.Path(torch.__file__).parent / 'lib' / "
                          "'libtorch_cuda.so')")
    result = in_image(lib, entrypoint="ldd")
    assert result.returncode == 0, result.stderr
    missing = sorted({line.split()[0] for line in result.stdout.splitlines() if "not found" in line})
    assert set(missing) <= {"libcuda.so.1"}, result.stdout
    assert "libcudart.so.13" in result.stdout and "libcublas.so.13" in result.stdout, result.stdout


def test_bitsandbytes_carries_its_cuda_13_library():
    # Located without importing bitsandbytes (its import probes for a GPU and only warns without one).
    listing = python_in_image(
        "import importlib.util, pathlib; "
        "spec = importlib.util.find_spec('bitsandbytes'); "
        "print(*sorted(p.name for p in pathlib.Path(spec.origin).parent.glob('libbitsandbytes_cuda*.so')))")
    assert "libbitsandbytes_cuda130.so" in listing.split(), listing


def test_check_without_a_gpu_fails_naming_the_fix():
    result = in_image("check", env=CONFIG)
    assert result.returncode == 1, result.stdout + result.stderr
    gpu_lines = [line for line in result.stdout.splitlines() if line.startswith("FAIL GPU: ")]
    assert gpu_lines and gpu_lines[0].startswith(f"FAIL GPU: {NO_GPU_LINE}"), result.stdout


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_run_without_a_gpu_refuses_to_serve_with_exit_78(device):
    result = in_image("run", env={**CONFIG, "FARLABS_DEVICE": device})
    assert result.returncode == 78, result.stdout + result.stderr
    assert f"config error: {NO_GPU_LINE}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_asking_for_the_cpu_is_not_refused():
    result = in_image("check", env={**CONFIG, "FARLABS_DEVICE": "cpu"})
    assert "OK   GPU: none needed: FARLABS_DEVICE=cpu" in result.stdout.splitlines(), result.stdout
