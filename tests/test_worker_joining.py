"""The coordinator hears of a worker at its start, not once its blocks are online.

A real `farworker run` downloads the tiny model, padded and throttled, from the fake hub
(tests/hub_server.py) while the reference coordinator listens on loopback: the worker must be registered
(blocks null: petals has not picked them) and heartbeating "joining" with its download progress before
the download ends, then "online" with its blocks, its registration refreshed with the model's size and
its addresses.
"""

from __future__ import annotations

import re
import shutil
import tempfile

import pytest
import requests
from hub_server import FakeHub, HubRepo, sharded_with_padding
from polling import wait_for

from farworker.config import load_config
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import Identity
from farworker.local_mesh import ManagedProcess, farworker_command, worker_env
from farworker.runner import Worker
from farworker.wire_records import HeartbeatRequest, RegisterRequest

REPO = "meta-llama/Llama-2-7b-chat-hf"  # a name on the fake hub; the bytes are the tiny model's
PADDING = 32 * 10**6  # an unused shard, so the download lasts
DOWNLOAD_SECONDS = 8.0
INTERVAL = 0.5  # the coordinator's heartbeat interval: several joining beats during the download
PROGRESS = re.compile(r"^downloading weights: [0-9.]+ of [0-9.]+ [kMG]?B \(([0-9]+)%\)$")


def test_registration_before_start_says_only_what_is_known(tmp_path):
    """Before the download: blocks are the operator's fixed span or null, the model's size and our
    addresses unknown, quantization as configured; both payloads are valid for the coordinator."""
    base = {
        "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20,
        "FARLABS_NEW_SWARM": "true",
        "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
        "FARLABS_STATE_DIR": str(tmp_path),
        "FARLABS_CACHE_DIR": str(tmp_path),
    }
    for extra, blocks in [({}, None), ({"FARLABS_BLOCK_INDICES": "2:4"}, [2, 4])]:
        worker = Worker(load_config({**base, **extra}))
        worker.identity = Identity.generate()
        registration, beat = worker.registration(), worker.heartbeat_payload()
        assert registration["blocks"] == blocks and registration["total_blocks"] is None
        assert registration["announce_maddrs"] == [] and registration["quant_type"] == "auto"
        assert beat["state"] == "joining" and beat["blocks"] == blocks and beat["phase"] == "starting"
        assert beat["counters"] == {"requests": 0, "inference_steps": 0, "tokens_processed": 0, "errors": 0}
        RegisterRequest.model_validate(registration)
        HeartbeatRequest.model_validate(beat)
        worker.state, worker.phase = "joining", "downloading weights"
        worker.progress.update(done=35, total=100)
        assert worker.heartbeat_payload()["phase"] == "downloading weights: 35.00 of 100.00 B (35%)"
        worker.state = "draining"
        assert "phase" not in worker.heartbeat_payload()
        worker.state = "online"  # before the first health check: no verdict to report yet
        assert "healthy" not in worker.heartbeat_payload()
        worker.healthy, worker.health_reason = False, "handler process 2 died"
        beat = worker.heartbeat_payload()
        assert (beat["healthy"], beat["health_reason"]) == (False, "handler process 2 died")
        HeartbeatRequest.model_validate(beat)
        worker.healthy, worker.health_reason = True, ""
        assert "healthy" not in worker.heartbeat_payload()


@pytest.fixture
def short_tmpdir():
    # hivemind's unix sockets land in TMPDIR; AF_UNIX names are limited to 108 bytes
    path = tempfile.mkdtemp(prefix="fw-join-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_worker_registers_and_beats_joining_while_it_downloads(tmp_path, tiny_files, short_tmpdir):
    settings = Settings(db_path=tmp_path / "coordinator.sqlite", heartbeat_interval_s=INTERVAL)
    with FakeHub() as hub, RunningCoordinator(settings) as coordinator:
        repo = hub.add_repo(HubRepo(REPO, sharded_with_padding(tiny_files, PADDING), gated=True))
        hub.bytes_per_second = repo.total_size / DOWNLOAD_SECONDS
        env = worker_env(tmp_path, "worker", coordinator.url, [], None, {
            "FARLABS_MODEL_NAME": REPO,
            "FARLABS_CACHE_DIR": str(tmp_path / "cache"),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_TOKEN": "test",  # the repo is gated, like the real one
            "TMPDIR": short_tmpdir,
        })
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "NOTIFY_SOCKET"):
            env.pop(key, None)
        proc = ManagedProcess("worker", farworker_command("run"), env, tmp_path / "worker.log").start()
        try:
            # What GET /v1/workers showed, polled fast, and whether the download had ended by then
            # (read after the answer: False means the coordinator knew this while bytes still flowed).
            seen: list[tuple[str, list | None, str | None, bool]] = []

            def online() -> dict | None:
                assert proc.alive, f"worker exited:\n{proc.log_tail()}"
                workers = requests.get(f"{coordinator.url}/v1/workers", timeout=5).json()["workers"]
                finished = hub.body_finished is not None
                if not workers:
                    return None
                w = workers[0]
                seen.append((w["state"], w["blocks"], (w["last_heartbeat"] or {}).get("phase"), finished))
                return w if w["state"] == "online" else None

            view = wait_for(online, 240, "the worker online at the coordinator", step=0.1)
            assert hub.body_started is not None and hub.body_finished is not None, "nothing was downloaded"

            during = [s for s in seen if not s[3]]
            assert during, f"the coordinator did not know the worker before its download ended: {seen[:5]}"
            assert all(state == "joining" and blocks is None for state, blocks, _, _ in during), during
            assert any(phase and PROGRESS.match(phase) for _, _, phase, _ in during), during

            beats = coordinator.store.heartbeats(view["worker_id"])
            states = [b["state"] for b in beats]
            first_online = states.index("online")
            assert first_online > 0 and set(states[:first_online]) == {"joining"}, states
            assert set(states[first_online:]) == {"online"}, states
            percents = [int(m[1]) for b in beats if b.get("phase") and (m := PROGRESS.match(b["phase"]))]
            assert len(percents) >= 2 and percents == sorted(percents), percents
            assert all(b["blocks"] == [0, 4] and b["phase"] is None for b in beats[first_online:])

            # registered again once petals started: the model's size, our quantization and addresses
            assert view["blocks"] == [0, 4] and view["total_blocks"] == 4
            assert view["announce_maddrs"] and all("/127.0.0.1/" in a for a in view["announce_maddrs"])
            log = (tmp_path / "worker.log").read_text(errors="replace")
            assert log.index("registered with the coordinator") < log.index("heartbeat ok: joining (")
            assert log.index("heartbeat ok: joining (") < log.index("Blocks 0:4 of")
            assert "registration updated with the coordinator" in log

            assert proc.stop(timeout=45) == 0, proc.log_tail()
            final = requests.get(f"{coordinator.url}/v1/workers/{view['worker_id']}", timeout=5).json()
            assert final["state"] == "offline"
        finally:
            proc.stop(timeout=30)
