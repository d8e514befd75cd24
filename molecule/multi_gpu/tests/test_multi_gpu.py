"""A multi-GPU host, two stand-in GPUs (CPU instances) on one container: both instances READY with their own
ports and peer ids, systemd's view of both, a generation through both, the upgrade from the single unit, and
removing an instance from farworker_gpus. The removal runs last: it changes the host.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
inventory = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
NAME = inventory.get_hosts("farworker")[0]
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
MESH_CHECK = PROJECT / "molecule" / "default" / "files" / "mesh_check.py"
CONVERGE = PROJECT / "molecule" / "multi_gpu" / "converge.yml"
sys.path.insert(0, str(PROJECT / "tests"))  # the project's own test helpers (tests/polling.py)
import polling  # noqa: E402

FARWORKER = "/opt/farworker/venv/bin/farworker"
INSTANCES = (0, 1)
BASE_PORT = 31330  # the role's farworker_port


def host():
    return testinfra.get_host(f"ansible://{NAME}?ansible_inventory={INVENTORY}")


def show(unit, *names):
    out = host().check_output(f"systemctl show {unit} " + " ".join(f"--property={n}" for n in names))
    return dict(line.split("=", 1) for line in out.splitlines())


def status_of(index):
    return json.loads(host().check_output(f"cat /var/lib/farworker/{index}/status.json"))


@pytest.fixture(scope="module")
def online():
    return {i: polling.wait_for(lambda i=i: (s := status_of(i)).get("state") == "online" and s, 120,
                                f"farworker@{i} online", step=1.0) for i in INSTANCES}


@pytest.mark.parametrize("index", INSTANCES)
def test_each_instance_is_ready_with_its_own_port_state_dir_and_gpu(index, online):
    unit = f"farworker@{index}.service"
    state = show(unit, "ActiveState", "SubState", "UnitFileState", "StatusText", "Environment", "DeviceAllow")
    assert (state["ActiveState"], state["SubState"], state["UnitFileState"]) == ("active", "running", "enabled")
    assert state["StatusText"].startswith("online:"), state["StatusText"]
    assert f"FARLABS_INSTANCE={index}" in state["Environment"]
    assert any(f"/tcp/{BASE_PORT + index}/" in m for m in online[index]["maddrs"]), online[index]["maddrs"]
    assert online[index]["instance"] == index and online[index]["gpu"] == "cpu"
    assert host().file(f"/var/lib/farworker/{index}/identity.key").user == "farworker"
    # one GPU per instance: the control devices, never every GPU's major
    allowed = host().check_output(f"systemctl show {unit} --property=DeviceAllow")
    assert "/dev/nvidiactl rw" in allowed and "char-nvidia-frontend" not in allowed


def test_instances_have_distinct_peer_ids(online):
    assert len({online[i]["peer_id"] for i in INSTANCES}) == len(INSTANCES)


def test_systemctl_status_shows_both_status_lines(online):
    out = host().run("systemctl status 'farworker@*' --no-pager --lines=0").stdout
    for index in INSTANCES:
        assert f"farworker@{index}.service" in out
    assert out.count('Status: "online:') == len(INSTANCES), out


def test_farworker_status_without_arguments_lists_every_instance(online):
    shown = host().run(f"{FARWORKER} status")
    assert shown.rc == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:3]] == [["0", "online"], ["1", "online"]], shown.stdout
    assert lines[3].startswith("total: 2 instances, 2 online and healthy"), shown.stdout


def test_a_client_generates_through_both_instances(online):
    h = host()
    h.ansible("copy", f"src={MESH_CHECK} dest=/var/tmp/mesh_check.py mode=0644", check=False)
    peers = h.check_output("cat /var/lib/farworker-bootstrap/bootstrap-maddrs.txt").split()
    local = [p for p in peers if "/127.0.0.1/" in p] or peers
    result = h.run(f"HF_HUB_OFFLINE=1 /opt/farworker/venv/bin/python /var/tmp/mesh_check.py "
                   f"--initial-peers {','.join(local)} --forward-mb 4")
    assert result.rc == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["got"] == answer["expected"]
    assert set(answer["servers"]) == {online[i]["peer_id"] for i in INSTANCES}


def test_upgrade_from_the_single_unit_kept_the_peer_id_and_the_outbox(online):
    h = host()
    single = json.loads(h.check_output("cat /var/tmp/single-unit.json"))
    assert online[0]["peer_id"] == single["peer_id"]
    assert not h.file("/var/lib/farworker/identity.key").exists
    assert not h.file("/etc/systemd/system/farworker.service").exists
    assert show("farworker.service", "ActiveState")["ActiveState"] == "inactive"

    def served():
        ledger = h.check_output("/opt/farworker/venv/bin/python -c \"import urllib.request; print(urllib.request"
                                ".urlopen('http://127.0.0.1:8080/v1/workers', timeout=10).read().decode())\"")
        workers = json.loads(ledger)["workers"]
        mine = [w for w in workers if w["peer_id"] == single["peer_id"]]
        return mine and mine[0]["tokens_served"] >= single["record"]["tokens"] and mine[0]

    worker = polling.wait_for(served, 60, "the single unit's record on the ledger", step=1.0)
    assert worker["instance"] == 0 and worker["host_id"]


@pytest.mark.timeout(900)  # a whole converge: minutes on a loaded machine (the project's default is 300 s)
def test_removing_an_instance_from_the_list_stops_and_disables_it(online):
    one = json.dumps({"farworker_gpus": [{"gpu": "cpu", "block_indices": "0:4"}]})
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_NOCOLOR="1")
    done = subprocess.run(["ansible-playbook", "-i", INVENTORY, str(CONVERGE), "-e", one], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:]
    gone = show("farworker@1.service", "ActiveState", "UnitFileState")
    assert gone["ActiveState"] == "inactive" and gone["UnitFileState"] != "enabled", gone
    assert not host().file("/etc/systemd/system/farworker@1.service.d").exists
    assert show("farworker@0.service", "ActiveState")["ActiveState"] == "active"
    assert host().file("/var/lib/farworker/1/identity.key").exists  # its identity stays for a later return
