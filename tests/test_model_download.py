"""The weight-download path without the internet: `farworker run` downloads from a local fake hub.

The fake hub (tests/hub_server.py) serves the tiny checkpoint the way huggingface.co does, under the
allowlisted name meta-llama/Llama-2-7b-chat-hf (gated, like the real one). The real hub client in the
worker (HF_ENDPOINT) downloads it; the test listens on a real NOTIFY_SOCKET:

1. STATUS shows download progress, EXTEND_TIMEOUT_USEC keeps arriving while the bytes flow, READY=1
   comes after the download, the tiny model's 4 blocks are served, SIGTERM exits 0.
2. The gated repo without HF_TOKEN (and with a refused one): exit 78, one line naming HF_TOKEN, no file
   in the cache and no file body served.
3. A download larger than FARLABS_MAX_DISK_SPACE: exit 78, one line naming it and the size needed,
   nothing in the cache.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hub_server import FakeHub, HubRepo, sharded_with_padding
from notify_listener import NotifyListener, tail

from farworker.local_mesh import farworker_command, worker_env
from farworker.model_source import COMPLETE_DIR, format_size, repo_cache_dir
from farworker.notify import StartupKeepalive
from farworker.status_file import read_status

REPO = "meta-llama/Llama-2-7b-chat-hf"  # a name on the fake hub; the bytes are the tiny model's
CLOSED_API = "http://127.0.0.1:9"  # nothing listens: the worker keeps serving and retries
PADDING = 64 * 10**6  # an unused shard, so progress is visible at the GB resolution of STATUS
# The worker's keepalive sends EXTEND_TIMEOUT_USEC (and STATUS) once per period: the download must span
# at least two of them to show them "keep arriving" and progress moving.
KEEPALIVE_PERIOD = inspect.signature(StartupKeepalive).parameters["period"].default
DOWNLOAD_SECONDS = max(6.0, 2.5 * KEEPALIVE_PERIOD)
PROGRESS = re.compile(r"downloading weights: ([0-9.]+) of ([0-9.]+) (TB|GB|MB|kB|B)")
UNITS = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1}


@pytest.fixture
def hub():
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def notify():
    listener = NotifyListener()
    yield listener
    listener.close()


@pytest.fixture
def spawn(tmp_path):
    """spawn(env) -> (Popen, log): `farworker run` in its own session; the whole group dies at teardown."""
    started: list[subprocess.Popen] = []
    temp_dirs: list[str] = []

    def start(env: dict[str, str], name: str = "worker") -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        # hivemind's unix sockets and multiprocessing's pymp-* dirs land here, not in the shared /tmp
        # (a short path: AF_UNIX names are limited to 108 bytes)
        temp_dirs.append(tempfile.mkdtemp(prefix="fw-dl-", dir="/tmp"))
        env = {**env, "TMPDIR": temp_dirs[-1]}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                farworker_command("run"),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started.append(proc)
        return proc, log

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        with contextlib.suppress(ProcessLookupError):  # its children (DHT, p2pd, ...) share its group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for path in temp_dirs:
        shutil.rmtree(path, ignore_errors=True)


def download_env(tmp_path: Path, hub: FakeHub, **extra: str | None) -> dict[str, str]:
    """worker_env's loopback private-swarm worker, pointed at the fake hub with a fresh cache."""
    env = worker_env(
        tmp_path,
        "worker",
        CLOSED_API,
        [],
        None,
        {
            "FARLABS_NEW_SWARM": "true",
            "FARLABS_MODEL_NAME": REPO,
            "FARLABS_CACHE_DIR": str(tmp_path / "cache"),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf-home"),  # no login token or cache of the machine's user
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        },
    )
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "NOTIFY_SOCKET",
    ):
        env.pop(key, None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def config_errors(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if line.startswith("config error:")]


@pytest.mark.slow
def test_download_reports_progress_extends_the_start_timeout_then_serves(tmp_path, hub, notify, spawn, tiny_files):
    repo = hub.add_repo(HubRepo(REPO, sharded_with_padding(tiny_files, PADDING), gated=True))
    hub.bytes_per_second = repo.total_size / DOWNLOAD_SECONDS
    env = download_env(tmp_path, hub, HF_TOKEN="test", NOTIFY_SOCKET=notify.path)
    began = time.monotonic()
    proc, log = spawn(env)

    ready_at = notify.wait_for("READY", "1", timeout=DOWNLOAD_SECONDS + 120, proc=proc, log=log)
    ready_after = time.monotonic() - began
    body_started, body_finished = hub.body_started, hub.body_finished
    assert body_started is not None and body_finished is not None, "no file body was downloaded"
    assert body_finished < ready_at, "READY=1 came before the download finished"

    # STATUS: progress with the right total, moving forward while the download runs.
    progress = []
    for at, status in notify.fields("STATUS"):
        match = PROGRESS.search(status)
        if match and at < ready_at:
            scale = UNITS[match[3]]
            progress.append((at, float(match[1]) * scale, float(match[2]) * scale, scale))
    assert len(progress) >= 2, f"expected several progress STATUS lines, got {notify.fields('STATUS')}"
    for _, done, total, scale in progress:
        assert abs(total - repo.total_size) <= 0.006 * scale, (total, repo.total_size)
        assert 0 <= done <= total
    dones = [done for _, done, _, _ in progress]
    assert dones == sorted(dones) and dones[-1] > dones[0], f"progress did not move forward: {progress}"
    assert any(0 < done < repo.total_size - 0.01 * scale for _, done, _, scale in progress), (
        "no STATUS showed the download partway"
    )

    # EXTEND_TIMEOUT_USEC kept arriving while the bytes flowed, and stopped once READY was sent.
    extends = notify.fields("EXTEND_TIMEOUT_USEC")
    during = [at for at, _ in extends if body_started <= at <= body_finished]
    assert len(during) >= 2, (
        f"{len(during)} EXTEND_TIMEOUT_USEC during the {body_finished - body_started:.1f} s download; all: {extends}"
    )
    assert all(int(usec) > 0 for _, usec in extends)
    assert all(at < ready_at for at, _ in extends), "EXTEND_TIMEOUT_USEC after READY=1"

    # The worker serves the tiny model (4 blocks) from the downloaded snapshot; the fake hub saw the token.
    deadline = time.monotonic() + 30
    while (status := read_status(tmp_path / "worker" / "state")) is None or status.get("state") != "online":
        assert time.monotonic() < deadline, f"no online status file:\n{tail(log)}"
        time.sleep(0.2)
    assert status["blocks"] == [0, 4]
    assert all(r.authorized for r in hub.requests if "/resolve/" in r.path)
    repo_dir = repo_cache_dir(tmp_path / "cache", REPO)
    snapshot = repo_dir / "snapshots" / repo.commit
    assert {p.name for p in snapshot.iterdir()} == set(repo.files)
    assert not [p for p in (repo_dir / "blobs").iterdir() if p.name.endswith(".incomplete")]
    assert (tmp_path / "cache" / COMPLETE_DIR / f"{repo_dir.name}.json").is_file()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(45) == 0, tail(log)
    assert notify.fields("STOPPING"), "no STOPPING=1 after SIGTERM"
    print(
        f"\ndownload {body_finished - body_started:.1f} s, READY after {ready_after:.1f} s, "
        f"{len(progress)} progress STATUS, {len(during)} EXTEND_TIMEOUT_USEC during the download"
    )


def test_gated_model_without_token_exits_78_before_writing(tmp_path, hub, spawn, tiny_files):
    hub.add_repo(HubRepo(REPO, tiny_files, gated=True))
    started = time.monotonic()
    proc, log = spawn(download_env(tmp_path, hub))
    assert proc.wait(90) == 78, tail(log)
    errors = config_errors(log)
    assert len(errors) == 1 and "HF_TOKEN" in errors[0] and REPO in errors[0], tail(log)
    assert "Traceback" not in log.read_text()
    assert files_under(tmp_path / "cache") == []
    assert hub.downloads() == []
    assert any(r.path.startswith("/api/models/") for r in hub.requests), "the hub was not asked"
    print(f"\ngated without token: exit 78 after {time.monotonic() - started:.1f} s: {errors[0]}")


def test_gated_model_with_refused_token_exits_78_before_writing(tmp_path, hub, spawn, tiny_files):
    hub.add_repo(HubRepo(REPO, tiny_files, gated=True, tokens=("accepted-license",)))
    proc, log = spawn(download_env(tmp_path, hub, HF_TOKEN="not-accepted"))
    assert proc.wait(90) == 78, tail(log)
    errors = config_errors(log)
    assert len(errors) == 1 and "HF_TOKEN was refused" in errors[0], tail(log)
    assert files_under(tmp_path / "cache") == []
    assert hub.downloads() == []
    assert any(r.status == 403 for r in hub.requests), "the hub never refused the token"


def test_download_larger_than_disk_budget_exits_78_before_writing(tmp_path, hub, spawn, tiny_files):
    repo = hub.add_repo(HubRepo(REPO, tiny_files, gated=True))
    started = time.monotonic()
    proc, log = spawn(download_env(tmp_path, hub, HF_TOKEN="test", FARLABS_MAX_DISK_SPACE="1MB"))
    assert proc.wait(90) == 78, tail(log)
    errors = config_errors(log)
    assert len(errors) == 1, tail(log)
    assert "FARLABS_MAX_DISK_SPACE" in errors[0] and format_size(repo.total_size) in errors[0], errors
    assert "Traceback" not in log.read_text()
    assert files_under(tmp_path / "cache") == []
    assert hub.downloads() == []
    print(f"\nover budget: exit 78 after {time.monotonic() - started:.1f} s: {errors[0]}")


def test_fake_hub_refuses_gated_files_like_the_real_hub(tmp_path, hub, tiny_files):
    """The fixture itself: the real client sees GatedRepoError (401 without, 403 with a wrong token)."""
    hub.add_repo(HubRepo(REPO, tiny_files, gated=True))
    code = (
        "import sys\n"
        "from huggingface_hub import HfApi, hf_hub_download\n"
        "from huggingface_hub.utils import GatedRepoError\n"
        f"info = HfApi().model_info({REPO!r}, files_metadata=True, token=False)\n"
        "assert info.gated == 'manual' and all(s.size for s in info.siblings), info\n"
        "for token in (False, 'wrong'):\n"
        "    try:\n"
        f"        hf_hub_download({REPO!r}, 'config.json', cache_dir=sys.argv[1], token=token)\n"
        "    except GatedRepoError as error:\n"
        "        print(error.response.status_code)\n"
        f"print(hf_hub_download({REPO!r}, 'config.json', cache_dir=sys.argv[1], token='test'))\n"
    )
    env = download_env(tmp_path, hub)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:2] == ["401", "403"] and lines[2].endswith("config.json")


DOWNLOAD_SCRIPT = """
import sys, threading
from farworker.config import load_config
from farworker.model_source import DownloadInterrupted, download_hub_model

stop_after = int(sys.argv[1])  # bytes on disk after which a stop is requested (0: never)
stop = threading.Event()

def on_progress(done, total):
    if stop_after and done >= stop_after:
        stop.set()

try:
    print("snapshot", download_hub_model(load_config(required=False), on_progress, stop=stop))
except DownloadInterrupted as error:
    print("interrupted", error)
"""


def run_download(env: dict[str, str], stop_after: int = 0) -> str:
    out = subprocess.run(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, str(stop_after)], env=env, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_download_stops_on_request_resumes_and_is_reused_offline(tmp_path, hub, tiny_files):
    """A stop mid-file keeps the partial blob, the next start resumes it with a Range request (not from
    zero), and once complete the snapshot serves with the hub unreachable (HF_HUB_OFFLINE=1)."""
    repo = hub.add_repo(HubRepo(REPO, sharded_with_padding(tiny_files, PADDING), gated=True))
    padding = "model-00002-of-00002.safetensors"
    hub.bytes_per_second = repo.total_size / 4
    env = download_env(tmp_path, hub, HF_TOKEN="test")
    blobs = repo_cache_dir(tmp_path / "cache", REPO) / "blobs"

    assert run_download(env, stop_after=20 * 10**6).startswith("interrupted")
    partial = blobs / f"{repo.lfs[padding]}.incomplete"
    assert partial.is_file() and 0 < partial.stat().st_size < len(repo.files[padding])
    assert not (tmp_path / "cache" / COMPLETE_DIR).exists()

    hub.bytes_per_second = None
    line = run_download(env)
    snapshot = repo_cache_dir(tmp_path / "cache", REPO) / "snapshots" / repo.commit
    assert line == f"snapshot {snapshot}"
    ranged = [r for r in hub.requests if r.status == 206]
    assert len(ranged) == 1 and ranged[0].path.startswith(f"/cdn/{repo.lfs[padding]}")
    assert all((snapshot / name).read_bytes() == data for name, data in repo.files.items())
    assert not [p for p in blobs.iterdir() if p.name.endswith(".incomplete")]

    asked = len(hub.requests)
    assert run_download({**env, "HF_HUB_OFFLINE": "1"}) == f"snapshot {snapshot}"
    assert len(hub.requests) == asked, "the offline start asked the hub"
