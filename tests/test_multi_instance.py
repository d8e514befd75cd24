"""Multi-GPU hosts: one worker per GPU (FARLABS_INSTANCE=N), configured from one env file.

The settings each instance derives (state dir, ports, GPU pinning), the upgrade from the single unit, the host
view of `farworker status`, and, with real parts, two instances of one host serving a generation together:
distinct peer ids and ports, their /metrics labelled with instance and GPU, and the coordinator's ledger
grouping them under one host. On CPU, FARLABS_GPU=cpu stands in for a GPU; pinning a GPU is tested over the
fake NVML of test_status_and_metrics_gpu.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from polling import wait_for
from test_status_and_metrics_gpu import CARDS, _fake_nvml

from farworker import gpu
from farworker.cli import main
from farworker.config import EX_CONFIG, ConfigError, load_config
from farworker.identity import host_id
from farworker.instances import adopt_single_unit_state, pin_gpu
from farworker.local_mesh import base_env, farworker_command
from farworker.status_file import write_status

GOOD = {
    "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20,
    "FARLABS_NEW_SWARM": "true",
    "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
}


def test_each_instance_gets_its_own_state_dir_ports_and_announce_address(tmp_path):
    env = {**GOOD, "FARLABS_STATE_DIR": str(tmp_path), "FARLABS_PORT": "31330", "FARLABS_METRICS_PORT": "9400",
           "FARLABS_HOST_MADDRS": "/ip4/0.0.0.0/tcp/31330,/ip4/0.0.0.0/udp/31330/quic,/ip6/::/tcp/0",
           "FARLABS_ANNOUNCE_MADDRS": "/dns4/gpu1.example.com/tcp/31330"}
    single = load_config(env)
    third = load_config({**env, "FARLABS_INSTANCE": "2"})
    assert (single.state_dir, single.port, single.metrics_port) == (tmp_path, 31330, 9400)
    assert third.state_dir == tmp_path / "2" and third.identity_path == tmp_path / "2" / "identity.key"
    assert (third.port, third.metrics_port) == (31332, 9402)
    assert third.listen_maddrs == ["/ip4/0.0.0.0/tcp/31332", "/ip4/0.0.0.0/udp/31332/quic", "/ip6/::/tcp/0"]
    assert third.announce_maddrs == ("/dns4/gpu1.example.com/tcp/31332",)
    off = load_config({**GOOD, "FARLABS_INSTANCE": "5", "FARLABS_PORT": "0"})
    assert (off.port, off.metrics_port) == (0, 0)  # any free port, and metrics off, stay so


@pytest.mark.parametrize(("env", "named", "accepted"), [
    ({"FARLABS_INSTANCE": "64"}, "FARLABS_INSTANCE='64'", "from 0 to 63"),
    ({"FARLABS_INSTANCE": "one"}, "FARLABS_INSTANCE='one'", "from 0 to 63"),
    ({"FARLABS_GPU": "GPU-zz"}, "FARLABS_GPU='GPU-zz'", "a GPU UUID"),
    ({"FARLABS_GPU": "tesla"}, "FARLABS_GPU='tesla'", "a GPU index from 0 to 63"),
    ({"FARLABS_HOST_ID": "rack 4/host 2"}, "FARLABS_HOST_ID=", "letters, digits"),
    ({"FARLABS_GPU": "1", "FARLABS_DEVICE": "cuda:1"}, "FARLABS_GPU=1 and FARLABS_DEVICE=cuda:1", "cuda:0"),
    ({"FARLABS_GPU": "cpu", "FARLABS_DEVICE": "cuda"}, "FARLABS_GPU=cpu and FARLABS_DEVICE=cuda", "auto or cpu"),
    ({"FARLABS_INSTANCE": "3", "FARLABS_PORT": "65534"}, "FARLABS_PORT=65534 plus FARLABS_INSTANCE=3",
     "from 1 to 65532"),
    ({"FARLABS_INSTANCE": "3", "FARLABS_ANNOUNCE_MADDRS": "/ip4/203.0.113.7/tcp/65535"},
     "FARLABS_ANNOUNCE_MADDRS=/ip4/203.0.113.7/tcp/65535 plus FARLABS_INSTANCE=3", "up to 65532"),
])
def test_bad_instance_settings_are_named_with_what_is_accepted(env, named, accepted):
    with pytest.raises(ConfigError) as caught:
        load_config({**GOOD, **env})
    (problem,) = caught.value.problems
    assert problem.startswith(named) and accepted in problem


def test_run_with_a_gpu_nvml_does_not_list_exits_78_naming_it(tmp_path):
    """No NVIDIA driver here: FARLABS_GPU=3 names no GPU. One line, exit 78 (systemd does not retry it)."""
    env = base_env({**GOOD, "FARLABS_STATE_DIR": str(tmp_path), "FARLABS_GPU": "3", "FARLABS_INSTANCE": "3"})
    done = subprocess.run(farworker_command("run"), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == EX_CONFIG, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("config error:")]
    assert errors == ["config error: FARLABS_GPU=3 names no GPU NVML lists: expected one of none: no NVIDIA "
                      "driver or GPU visible, or cpu"], done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def two_gpus(monkeypatch):
    fake = _fake_nvml()
    fake.nvmlSystemGetDriverVersion = lambda: "580.65.06"
    fake.nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
    monkeypatch.setattr(gpu, "_nvml", lambda: fake)
    yield
    gpu.own_gpus(None)


@pytest.mark.parametrize("named", ["1", CARDS[1]["uuid"]])
def test_a_pinned_worker_sees_and_reports_only_its_gpu_by_uuid(two_gpus, named):
    environ = {}
    config = load_config({**GOOD, "FARLABS_GPU": named, "FARLABS_INSTANCE": "1"})
    assert pin_gpu(config, environ) == CARDS[1]["uuid"]
    # the UUID, not the index: CUDA's order of GPUs need not be NVML's
    assert environ["CUDA_VISIBLE_DEVICES"] == CARDS[1]["uuid"]
    assert [g["uuid"] for g in gpu.telemetry()] == [CARDS[1]["uuid"]]  # NVML itself would list both
    summary = gpu.hardware_summary()
    assert summary["gpu_count"] == 1 and summary["gpus"][0]["name"] == CARDS[1]["name"]


def test_a_cpu_instance_hides_every_gpu(two_gpus):
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert pin_gpu(load_config({**GOOD, "FARLABS_GPU": "cpu"}), environ) is None
    assert environ["CUDA_VISIBLE_DEVICES"] == "" and gpu.telemetry() == []


def test_check_checks_every_gpu(two_gpus, tmp_path):
    env = {**GOOD, "FARLABS_STATE_DIR": str(tmp_path), "FARLABS_CACHE_DIR": str(tmp_path),
           "FARLABS_MODEL_NAME": "meta-llama/Llama-2-7b-chat-hf"}
    from farworker.preflight import check_every_gpu

    every = check_every_gpu(load_config(env))
    assert [r.item for r in every] == ["VRAM GPU 0", "VRAM GPU 1"]
    assert "on GPU 0" in every[0].detail and "on GPU 1" in every[1].detail
    (pinned,) = check_every_gpu(load_config({**env, "FARLABS_GPU": CARDS[1]["uuid"]}))
    assert pinned.item == "VRAM GPU 1" and "on GPU 1" in pinned.detail
    (unknown,) = check_every_gpu(load_config({**env, "FARLABS_GPU": "7"}))
    assert unknown.level == "FAIL" and "FARLABS_GPU=7 names no GPU" in unknown.detail


def test_host_id_is_the_same_for_every_instance_and_differs_per_machine(tmp_path):
    one, other = tmp_path / "machine-id-1", tmp_path / "machine-id-2"
    one.write_text("0123456789abcdef0123456789abcdef\n")
    other.write_text("fedcba9876543210fedcba9876543210\n")
    first, second = (load_config({**GOOD, "FARLABS_INSTANCE": str(i)}) for i in (0, 1))
    assert host_id(first, str(one)) == host_id(second, str(one))
    assert host_id(first, str(one)) != host_id(first, str(other))
    assert "0123456789abcdef" not in host_id(first, str(one))  # systemd: don't expose the machine id itself
    assert host_id(load_config({**GOOD, "FARLABS_HOST_ID": "rack4-gpu2"}), str(one)) == "rack4-gpu2"


def _status(peer: str, state="online", healthy=True, tokens=0, rate=0.0, instance=None, gpus=()) -> dict:
    return {"state": state, "healthy": healthy, "health_reason": "" if healthy else "runtime stalled",
            "model_name": "farworker-tiny-llama", "blocks": [0, 4], "peer_id": peer, "open_sessions": 1,
            "counters": {"tokens_processed": tokens}, "outbox_depth": 2, "instance": instance, "gpu": None,
            "gpus": list(gpus), "last_heartbeat": {"at": time.time(), "answer": {"earn_rate_far_per_hour": rate}}}


def test_status_without_arguments_shows_every_instance_and_totals(tmp_path):
    for index in (0, 1):
        (tmp_path / str(index)).mkdir()
    write_status(tmp_path / "0", _status("QmPeerZero", tokens=100, rate=0.5, instance=0,
                                         gpus=[{"index": 0, "uuid": CARDS[0]["uuid"], "name": CARDS[0]["name"]}]))
    write_status(tmp_path / "1", _status("QmPeerOne", tokens=20, rate=0.25, instance=1,
                                         gpus=[{"index": 1, "uuid": CARDS[1]["uuid"], "name": CARDS[1]["name"]}]))
    runner = CliRunner()
    shown = runner.invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    header, zero, one, total = shown.output.splitlines()
    assert zero.split()[:3] == ["0", "online", CARDS[0]["uuid"][:12]] and zero.endswith("QmPeerZero")
    assert one.split()[:3] == ["1", "online", CARDS[1]["uuid"][:12]] and one.endswith("QmPeerOne")
    assert total == ("total: 2 instances, 2 online and healthy, 2 open sessions, 120 tokens, 4 usage records "
                     "waiting, earn rate 0.75 $FAR/h")
    full = runner.invoke(main, ["status", "--state-dir", str(tmp_path), "--instance", "1"])
    assert full.exit_code == 0 and "peer id        QmPeerOne" in full.output

    # one instance unhealthy: its line says so and the exit status is 1
    write_status(tmp_path / "1", _status("QmPeerOne", healthy=False, instance=1))
    shown = runner.invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert shown.exit_code == 1 and shown.output.splitlines()[2].split()[1] == "unhealthy"
    assert "2 instances, 1 online and healthy" in shown.output
    assert runner.invoke(main, ["status", "--state-dir", str(tmp_path), "--instance", "5"]).exit_code == 3


def test_upgrade_from_the_single_unit_moves_identity_and_outbox_to_instance_0(tmp_path):
    """The single worker's peer id and its unacknowledged usage records (in the database and in its -wal file)
    belong to instance 0 afterwards."""
    from farworker.identity import load_or_create
    from farworker.outbox import Outbox

    single = load_config({**GOOD, "FARLABS_STATE_DIR": str(tmp_path)})
    peer = load_or_create(single.identity_path).peer_id
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    record = {"id": "6a1f0c1e-8f5c-4a7e-9b57-3a5d3c2f1e01", "session_id": "s1", "blocks": [0, 4], "tokens": 42,
              "steps": 3, "started_at": 1.0, "ended_at": 2.0}
    outbox.add(record)
    before = outbox.pending(100)
    write_status(tmp_path, {**_status(peer), "state": "stopped", "pid": 1})
    # the records sit in the WAL until a checkpoint; a copy of the database file alone would lose them
    assert (tmp_path / "outbox.sqlite3-wal").stat().st_size > 0

    zero = load_config({**GOOD, "FARLABS_STATE_DIR": str(tmp_path), "FARLABS_INSTANCE": "0"})
    moved = adopt_single_unit_state(zero.state_dir, zero.instance)
    assert "identity.key" in moved and "outbox.sqlite3" in moved
    assert load_or_create(zero.identity_path).peer_id == peer
    assert Outbox(zero.state_dir / "outbox.sqlite3").pending(100) == before and before
    assert not (tmp_path / "identity.key").exists() and not (tmp_path / "status.json").exists()
    assert adopt_single_unit_state(zero.state_dir, 0) == []  # a restart of instance 0 moves nothing
    one = load_config({**GOOD, "FARLABS_STATE_DIR": str(tmp_path), "FARLABS_INSTANCE": "1"})
    assert adopt_single_unit_state(one.state_dir, 1) == []


def test_instance_0_refuses_the_identity_of_a_single_worker_still_running(tmp_path):
    from farworker.identity import load_or_create

    single = load_config({**GOOD, "FARLABS_STATE_DIR": str(tmp_path)})
    load_or_create(single.identity_path)
    write_status(tmp_path, {**_status("QmRunning"), "pid": os.getpid()})  # alive: this test's own process
    with pytest.raises(ConfigError) as caught:
        adopt_single_unit_state(tmp_path / "0", 0)
    assert "still runs" in caught.value.problems[0] and (tmp_path / "identity.key").exists()


def _free_port_pair() -> int:
    """A port p with p and p+1 free on loopback now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two consecutive free ports")


@pytest.mark.slow
def test_two_instances_of_one_host_serve_together_and_the_ledger_groups_them(tmp_path, bootstrap_peer, tiny_model):
    from farworker.coordinator.app import Settings
    from farworker.coordinator.service import RunningCoordinator
    from farworker.local_mesh import ManagedProcess, WorkerHandle, stop_all, worker_env
    from farworker.tiny_model import TINY_MODEL_NAME

    coordinator = RunningCoordinator(Settings(
        db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=tiny_model,
        model_name=TINY_MODEL_NAME, initial_peers=tuple(bootstrap_peer), probe_period_s=0,
    ), port=0).start()
    url = f"http://127.0.0.1:{coordinator.port}"
    base_state, p2p, metrics = tmp_path / "host" / "state", _free_port_pair(), _free_port_pair()
    workers: list[WorkerHandle] = []
    try:
        # one env for the host, as the role writes it; only FARLABS_INSTANCE differs (farworker@N's %i)
        for index, span in enumerate(["0:2", "2:4"]):
            env = worker_env(tmp_path, "host", url, bootstrap_peer, span, {
                "FARLABS_STATE_DIR": str(base_state), "FARLABS_HOST_MADDRS": f"/ip4/127.0.0.1/tcp/{p2p}",
                "FARLABS_METRICS_PORT": str(metrics), "FARLABS_GPU": "cpu", "FARLABS_INSTANCE": str(index)})
            proc = ManagedProcess(f"instance{index}", farworker_command("run"), env,
                                  tmp_path / f"instance{index}.log").start()
            workers.append(WorkerHandle(proc, base_state / str(index), env))
        online = [w.wait_online(timeout=180) for w in workers]
        assert online[0]["peer_id"] != online[1]["peer_id"]
        assert [w.state_dir.joinpath("identity.key").is_file() for w in workers] == [True, True]
        for index, status in enumerate(online):
            assert any(m.startswith(f"/ip4/127.0.0.1/tcp/{p2p + index}/") for m in status["maddrs"]), status["maddrs"]

        answer = requests.post(f"{url}/v1/completions", json={"prompt": [1, 37, 101, 250], "max_tokens": 6},
                               timeout=120)
        assert answer.status_code == 200, answer.text
        route = answer.json()["route"]
        assert {span["peer_id"] for span in route} == {s["peer_id"] for s in online}  # through both instances
        routed = sum(span["tokens"] for span in route)

        def one_host():
            hosts = requests.get(f"{url}/v1/hosts", timeout=10).json()["hosts"]
            return hosts if len(hosts) == 1 and hosts[0]["tokens_attested"] == routed else None

        (host,) = wait_for(one_host, 60, "the host's attested tokens to equal the route's")
        listed = {w["peer_id"]: w for w in requests.get(f"{url}/v1/workers", timeout=10).json()["workers"]}
        assert {listed[s["peer_id"]]["instance"] for s in online} == {0, 1}
        assert listed[online[0]["peer_id"]]["host_id"] == listed[online[1]["peer_id"]]["host_id"] == host["host_id"]
        assert host["host_id"] == online[0]["host_id"] and host["workers_online"] == 2
        assert sorted(host["worker_ids"]) == sorted(w["worker_id"] for w in listed.values())
        assert host["earnings_far"] == pytest.approx(sum(w["earnings_far"] for w in listed.values()))

        shown = subprocess.run([sys.executable, "-m", "farworker", "status", "--state-dir", str(base_state)],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        lines = shown.stdout.splitlines()
        assert [line.split()[0] for line in lines[1:3]] == ["0", "1"] and "2 online and healthy" in lines[3]

        for index in range(len(online)):
            scraped = requests.get(f"http://127.0.0.1:{metrics + index}/metrics", timeout=10).text
            healthy = re.search(r'^farworker_healthy\{(.*)\} 1\.0$', scraped, re.M)
            assert healthy and f'worker_instance="{index}"' in healthy[1] and 'gpu_uuid="cpu"' in healthy[1]
    finally:
        stop_all((worker.proc for worker in workers), timeout=45)  # together: each drain takes seconds
        coordinator.stop()


def test_gpus_lists_each_gpu_with_its_device_for_the_role(two_gpus, monkeypatch):
    """The role reads `farworker gpus --json`: NVML's index, the UUID, and the minor number of /dev/nvidiaN, which
    need not equal the index (here GPU 0 is /dev/nvidia1)."""
    import json

    monkeypatch.setattr(gpu._nvml(), "nvmlDeviceGetMinorNumber", lambda handle: 1 - handle, raising=False)
    shown = CliRunner().invoke(main, ["gpus", "--json"])
    assert shown.exit_code == 0, shown.output
    listed = json.loads(shown.output)
    assert [(g["index"], g["uuid"], g["minor_number"]) for g in listed] == [
        (0, CARDS[0]["uuid"], 1), (1, CARDS[1]["uuid"], 0)]


def test_persistence_mode_is_read_per_gpu(two_gpus, monkeypatch):
    """`farworker check` warns per GPU without persistence mode: GPU 1 here has it off, GPU 0 on."""
    nvml = gpu._nvml()
    monkeypatch.setattr(nvml, "NVML_FEATURE_ENABLED", 1, raising=False)  # NVML's values: enabled 1, disabled 0
    modes = {0: 1, 1: 0}
    monkeypatch.setattr(nvml, "nvmlDeviceGetPersistenceMode", lambda handle: modes[handle], raising=False)
    assert gpu.persistence_modes() == {0: True, 1: False}


def _render(template: str, **variables) -> str:
    import jinja2

    directory = Path(__file__).resolve().parent.parent / "roles" / "farworker" / "templates"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
                             trim_blocks=True)
    return env.get_template(template).render(**variables)


def test_the_template_unit_allows_each_instance_its_own_gpu_only(tmp_path):
    unit = _render("farworker.service.j2", _farworker_template_unit=True)
    assert "Environment=FARLABS_INSTANCE=%i" in unit and "Description=Far Labs mesh worker %i" in unit
    devices = re.findall(r"^DeviceAllow=(.*)$", unit, re.M)
    assert devices == ["/dev/nvidiactl rw", "/dev/nvidia-modeset rw", "char-nvidia-uvm rw", "char-nvidia-caps r"]
    single = _render("farworker.service.j2")
    assert "char-nvidia-frontend rw" in single and "FARLABS_INSTANCE" not in single

    second = _render("farworker-instance.conf.j2", item={"index": 1, "gpu": CARDS[1]["uuid"], "minor_number": 3,
                                                         "block_indices": "16:32"})
    assert f"Environment=FARLABS_GPU={CARDS[1]['uuid']}" in second
    assert "DeviceAllow=/dev/nvidia3 rw" in second and "After=farworker@0.service" in second
    assert "Environment=FARLABS_BLOCK_INDICES=16:32" in second
    cpu = _render("farworker-instance.conf.j2", item={"index": 0, "gpu": "cpu", "minor_number": None,
                                                      "block_indices": ""})
    assert "DeviceAllow" not in cpu and "After=" not in cpu and "FARLABS_BLOCK_INDICES" not in cpu


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_template_unit_keeps_the_sandbox(tmp_path):
    unit = tmp_path / "farworker@.service"
    unit.write_text(_render("farworker.service.j2", _farworker_template_unit=True))
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"Overall exposure level for farworker@\w*\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0


def _choose(farworker_gpus, found: list[dict]) -> dict:
    """roles/farworker/tasks/select_instances.yml's choice, rendered as Ansible renders it (its filters and the
    `match` test stood in by their definitions), over what `farworker gpus --json` printed."""
    import json

    import jinja2
    import yaml

    tasks = yaml.safe_load((Path(__file__).resolve().parent.parent / "roles" / "farworker" / "tasks" /
                            "select_instances.yml").read_text())
    (choose,) = [t for t in tasks if t["name"] == "Choose the worker instances"]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters.update(from_json=json.loads, to_json=json.dumps)
    env.tests["match"] = lambda value, pattern: re.match(pattern, value) is not None
    rendered = env.from_string(choose["ansible.builtin.set_fact"]["_farworker_instance_choice"]).render(
        farworker_gpus=farworker_gpus, _farworker_gpu_list={"stdout": json.dumps(found)})
    return json.loads(rendered)


FOUND = [{"index": 0, "uuid": CARDS[0]["uuid"], "minor_number": 1}, {"index": 1, "uuid": CARDS[1]["uuid"],
                                                                       "minor_number": 0}]


def test_the_role_chooses_one_instance_per_gpu_by_default_and_the_single_unit_below_two():
    both = _choose("auto", FOUND)["instances"]
    assert [(i["index"], i["gpu"], i["minor_number"]) for i in both] == [(0, CARDS[0]["uuid"], 1),
                                                                        (1, CARDS[1]["uuid"], 0)]
    assert _choose("auto", FOUND[:1])["instances"] == [] and _choose("auto", [])["instances"] == []
    assert _choose([], FOUND)["instances"] == []  # a CPU worker in the single unit


def test_the_role_takes_indices_uuids_cpu_and_spans_and_names_an_unknown_gpu():
    chosen = _choose([1, CARDS[0]["uuid"], "cpu", {"gpu": 0, "block_indices": "16:32"}], FOUND)
    assert [(i["index"], i["gpu"], i["minor_number"], i["block_indices"]) for i in chosen["instances"]] == [
        (0, CARDS[1]["uuid"], 0, ""), (1, CARDS[0]["uuid"], 1, ""), (2, "cpu", None, ""),
        (3, CARDS[0]["uuid"], 1, "16:32")]
    wrong = _choose([0, 7, "GPU-00000000-0000-0000-0000-000000000000"], FOUND)
    assert wrong["unknown"] == ["7", "GPU-00000000-0000-0000-0000-000000000000"]
