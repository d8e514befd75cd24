"""The container image against a real docker daemon (scripts/ci-docker.sh builds the image, then runs this).

Skipped unless FARWORKER_DOCKER_TESTS=1 and a docker daemon answers, so a plain `pytest` without docker
passes. The image under test is FARWORKER_DOCKER_IMAGE (default farworker:ci).

Network: only the docker network this module creates (a private subnet) and the host's side of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

IMAGE = os.environ.get("FARWORKER_DOCKER_IMAGE", "farworker:ci")
# A private subnet for the test's own network, so the worker can announce its address before it starts.
SUBNET = os.environ.get("FARWORKER_DOCKER_SUBNET", "10.231.47.0/24")
WORKER_IP = SUBNET.rsplit(".", 1)[0] + ".10"
PORT = 31330
WALLET = "0x" + "ab" * 20
# The container's own loopback: nothing listens; the worker serves and retries.
CLOSED_API = "http://127.0.0.1:9"
HEALTHY_TIMEOUT = 240.0
TINY = "farworker-tiny-llama"


def _docker_available() -> bool:
    if os.environ.get("FARWORKER_DOCKER_TESTS") != "1" or shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "version"], capture_output=True, timeout=30).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _docker_available(), reason="needs FARWORKER_DOCKER_TESTS=1 and a docker daemon"),
]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def inspect(name: str, fmt: str) -> str:
    return docker("inspect", "-f", fmt, name).stdout.strip()


def logs(name: str) -> str:
    result = docker("logs", name, check=False)
    return result.stdout + result.stderr


def worker_env(**extra: str) -> list[str]:
    env = {
        "FARLABS_WALLET_ADDRESS": WALLET,
        "FARLABS_MODEL_NAME": TINY,
        "FARLABS_TORCH_DTYPE": "float32",
        "FARLABS_DEVICE": "cpu",
        "FARLABS_NEW_SWARM": "true",
        "FARLABS_HOST_MADDRS": f"/ip4/0.0.0.0/tcp/{PORT}",
        "FARLABS_ANNOUNCE_MADDRS": f"/ip4/{WORKER_IP}/tcp/{PORT}",
        "FARLABS_API_BASE_URL": CLOSED_API,
        "HF_HUB_OFFLINE": "1",
        **extra,
    }
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


@pytest.fixture(scope="module")
def names():
    """Unique names for this run's containers, network and volumes; everything is removed afterwards."""
    run = uuid.uuid4().hex[:8]
    made: dict[str, list[str]] = {"containers": [], "volumes": [], "networks": []}

    def name(kind: str, what: str) -> str:
        full = f"farworker-test-{what}-{run}"
        made[kind].append(full)
        return full

    yield name
    for container in made["containers"]:
        docker("rm", "-f", "-v", container, check=False)
    for volume in made["volumes"]:
        docker("volume", "rm", "-f", volume, check=False)
    for network in made["networks"]:
        docker("network", "rm", network, check=False)


@pytest.fixture(scope="module")
def network(names):
    name = names("networks", "net")
    docker("network", "create", "--driver", "bridge", "--subnet", SUBNET, name)
    return name


@pytest.fixture(scope="module")
def refused(names):
    """The two containers that must refuse to start, run concurrently with the worker's start (with vfs,
    creating a container copies the whole image: tens of seconds each on 2 cores). name -> Popen."""
    runs = {
        "bad-variable": ["--shm-size", "1g", *worker_env(FARLABS_WALLET_ADDRESS="0x12")],
        "default-shm": worker_env(),  # docker's default 64 MB /dev/shm
    }
    procs = {
        what: subprocess.Popen(
            ["docker", "run", "--rm", "--name", names("containers", what), *args, IMAGE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for what, args in runs.items()
    }
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.communicate()


def refused_result(procs, what: str) -> tuple[int, str]:
    _, stderr = procs[what].communicate(timeout=300)
    return procs[what].returncode, stderr


@pytest.fixture(scope="module")
def worker(names, network, refused):
    """One worker container on the tiny model, private swarm; yields (name, state volume) once healthy."""
    name, state = names("containers", "worker"), names("volumes", "state")
    cache = names("volumes", "cache")
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        network,
        "--ip",
        WORKER_IP,
        "--shm-size",
        "1g",
        "-v",
        f"{state}:/var/lib/farworker",
        "-v",
        f"{cache}:/var/cache/farworker",
        *worker_env(),
        IMAGE,
    )
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    health = ""
    while time.monotonic() < deadline:
        health = inspect(name, "{{.State.Health.Status}}")
        if health == "healthy":
            break
        if inspect(name, "{{.State.Running}}") != "true":
            pytest.fail(f"worker container exited ({inspect(name, '{{.State.ExitCode}}')}):\n{logs(name)[-4000:]}")
        time.sleep(2)
    else:
        pytest.fail(f"worker container not healthy after {HEALTHY_TIMEOUT} s ({health}):\n{logs(name)[-4000:]}")
    return name, state


@pytest.fixture(scope="module")
def identity_probe(worker):
    """A new container on the worker's state volume that prints the peer id of the key it finds there.
    Started while the worker serves (the key exists once it is healthy), so its creation overlaps."""
    _, state = worker
    proc = subprocess.Popen(
        [
            "docker",
            "run",
            "--rm",
            "-v",
            f"{state}:/var/lib/farworker",
            "--entrypoint",
            "/opt/farworker/bin/python",
            IMAGE,
            "-c",
            "from farworker.identity import load_or_create; "
            "print(load_or_create('/var/lib/farworker/identity.key').peer_id)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.kill()
    proc.communicate()


def test_image_config():
    """The image builds (ci-docker.sh built it) and says how it runs: user, volumes, health, signal, init."""
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", IMAGE).stdout)
    assert config["User"] == "farworker"
    assert set(config["Volumes"]) == {"/var/lib/farworker", "/var/cache/farworker"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["FARLABS_STATE_DIR"] == "/var/lib/farworker"
    assert env["FARLABS_CACHE_DIR"] == "/var/cache/farworker"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"][:2] == ["/usr/bin/tini", "--"]
    assert config["Cmd"] == ["run"]
    assert config["Labels"]["farworker.torch-variant"] == "cpu"  # the build checked its torch is the CPU build


def test_worker_healthy_and_serves_equal_tokens(worker, identity_probe, tiny_model):
    """Healthy per the HEALTHCHECK, status says online, and a host client generates through it."""
    name, _ = worker
    assert inspect(name, "{{.Config.User}}") == "farworker"
    assert docker("exec", name, "id", "-u").stdout.strip() != "0"
    # The same pinned set as the venv install: every pin of runtime.lock, and torch.
    script = "import importlib.metadata as m; print(*(f'{d.name}=={d.version}' for d in m.distributions()))"
    installed = {p.lower().replace("_", "-") for p in docker("exec", name, "python", "-c", script).stdout.split()}
    lock = (Path(__file__).parent.parent / "roles" / "farworker_package" / "files" / "runtime.lock").read_text()
    pins = [line.strip().lower() for line in lock.splitlines() if line.strip() and not line.startswith("#")]
    missing = [p for p in pins if p.replace("_", "-") not in installed]
    assert not missing, f"pins of runtime.lock missing in the image: {missing}"
    # A worker image: the coordinator's extra (coordinator.lock) stays out.
    assert not {p.split("==")[0] for p in installed} & {"fastapi", "uvicorn", "starlette"}
    assert any(p.startswith("torch==") for p in installed)

    status = json.loads(docker("exec", name, "farworker", "status", "--json").stdout)
    assert status["state"] == "online" and status["healthy"] and status["blocks"] == [0, 4]
    peer_id = status["peer_id"]

    from farworker.coordinator.mesh import CompletionsMesh as MeshClient
    from farworker.local_reference import generate_locally

    prompt, n = [1, 15, 42, 7, 99], 8
    client = MeshClient(tiny_model, initial_peers=[f"/ip4/{WORKER_IP}/tcp/{PORT}/p2p/{peer_id}"], dht_prefix=TINY)
    try:
        generation = client.generate(prompt, n, 0)
    finally:
        client.close()
    assert generation.completion_ids == generate_locally(str(tiny_model), prompt, n)
    assert {hop["peer_id"] for hop in generation.route} == {peer_id}


def test_docker_stop_drains_cleanly(worker, identity_probe):
    """SIGTERM from `docker stop` (default 10 s timeout): drained, exit 0, before docker's SIGKILL."""
    name, state = worker
    peer_id = json.loads(docker("exec", name, "farworker", "status", "--json").stdout)["peer_id"]
    started = time.monotonic()
    docker("stop", name, timeout=60)
    took = time.monotonic() - started
    print(f"docker stop took {took:.1f} s")
    output = logs(name)
    # 0, not docker's SIGKILL at 10 s (137): how long `docker stop` itself took is docker's and the machine's
    assert inspect(name, "{{.State.ExitCode}}") == "0", output[-4000:]
    assert "Received SIGTERM" in output and "Stopped cleanly" in output, output[-4000:]
    # The state volume keeps the identity key: a new container on it has the same peer id.
    out, err = identity_probe.communicate(timeout=300)
    assert identity_probe.returncode == 0, err
    assert out.strip() == peer_id


def test_bad_variable_exits_78_with_clear_message(refused):
    code, stderr = refused_result(refused, "bad-variable")
    assert code == 78, stderr
    assert "config error: FARLABS_WALLET_ADDRESS='0x12' is invalid: expected 0x followed by 40 hex digits" in stderr


def test_default_shm_refused_with_clear_message(refused):
    """Docker's default 64 MB /dev/shm: the worker refuses to start, says why and how to fix it."""
    code, stderr = refused_result(refused, "default-shm")
    assert code == 78, stderr
    assert "config error: /dev/shm is 64 MiB, the worker needs at least 1.00 GiB" in stderr, stderr
    assert "--shm-size" in stderr, stderr
