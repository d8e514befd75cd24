"""The fleet on systemd containers: service health, files, the mesh, and the faults systemd must handle.

Tests run in file order; the fault checks come last and leave each worker active again.
"""

import json
import os
import time

import pytest
import testinfra.utils.ansible_runner

inventory = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
WORKERS = sorted(inventory.get_hosts("farworker"))
BOOT = inventory.get_hosts("mesh_bootstrap")[0]
CLIENT = os.path.join(os.path.dirname(__file__), "..", "files", "mesh_client.py")


def host(name):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={os.environ['MOLECULE_INVENTORY_FILE']}")


def props(h, unit, *names):
    out = h.check_output(f"systemctl show {unit} " + " ".join(f"--property={n}" for n in names))
    return dict(line.split("=", 1) for line in out.splitlines())


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.parametrize("name", WORKERS)
def test_worker_active_and_ready(name):
    p = props(host(name), "farworker", "ActiveState", "SubState", "StatusText", "Type", "NRestarts")
    assert p["ActiveState"] == "active" and p["SubState"] == "running", p
    assert p["Type"] == "notify"
    # READY=1 comes with a status line saying what the worker serves.
    assert p["StatusText"], p


def test_bootstrap_active_with_stable_identity():
    h = host(BOOT)
    assert props(h, "farworker-bootstrap", "ActiveState")["ActiveState"] == "active"
    key = h.file("/var/lib/farworker-bootstrap/identity.key")
    assert key.exists and key.user == "farworker" and key.mode & 0o077 == 0
    assert "/p2p/" in h.file("/var/lib/farworker-bootstrap/bootstrap-maddrs.txt").content_string


def test_wheelhouse_pushed_from_the_control_node():
    """fw-worker2 has no wheelhouse mount (molecule.yml): the role copied the control node's wheelhouse to it,
    and its venv was installed from that copy with --no-index."""
    pushed = [name for name in WORKERS if inventory.get_variables(name).get("farworker_wheelhouse_src")]
    assert pushed, "no worker in the inventory sets farworker_wheelhouse_src"
    source = os.environ["FARWORKER_WHEELHOUSE"]
    expected = sorted(f for f in os.listdir(source) if f.endswith((".whl", ".tar.gz")))
    for name in pushed:
        h = host(name)
        assert not h.run("findmnt --noheadings /opt/farworker/wheelhouse").stdout.strip(), "wheelhouse is a mount"
        listing = h.check_output("find /opt/farworker/wheelhouse -maxdepth 1 -type f -printf '%f %u %m %s\\n'")
        files = {line.split()[0]: line.split()[1:] for line in listing.splitlines()}
        assert sorted(f for f in files if f.endswith((".whl", ".tar.gz"))) == expected
        for wheel in expected:
            assert files[wheel] == ["root", "644", str(os.path.getsize(os.path.join(source, wheel)))], wheel
        assert h.run("/opt/farworker/venv/bin/farworker --version").rc == 0


@pytest.mark.parametrize("name", WORKERS)
def test_env_file_owner_and_mode(name):
    f = host(name).file("/etc/farworker/farworker.env")
    assert (f.user, f.group, f.mode) == ("root", "farworker", 0o640)
    assert 'FARLABS_WALLET_ADDRESS="0x1111111111111111111111111111111111111111"' in f.content_string
    assert "FARLABS_DHT_BOOTSTRAP=\"/ip4/" in f.content_string
    d = host(name).file("/etc/farworker")
    assert (d.user, d.group, d.mode) == ("root", "farworker", 0o750)


@pytest.mark.parametrize("name", WORKERS)
def test_unit_properties(name):
    h = host(name)
    p = props(h, "farworker", "NotifyAccess", "WatchdogUSec", "Restart", "RestartPreventExitStatus",
              "StartLimitBurst", "TimeoutStopUSec", "LimitNOFILE", "User", "ProtectSystem", "PrivateTmp",
              "NoNewPrivileges", "TemporaryFileSystem", "DevicePolicy", "StateDirectory", "CacheDirectory",
              "After", "UnitFileState")
    assert p["NotifyAccess"] == "main"
    assert p["WatchdogUSec"] == "10s"
    assert p["Restart"] == "on-failure"
    assert "78" in p["RestartPreventExitStatus"]
    assert p["StartLimitBurst"] == "5"
    assert p["TimeoutStopUSec"] == "15s"
    assert p["LimitNOFILE"] == "65536"
    assert p["User"] == "farworker"
    assert (p["ProtectSystem"], p["PrivateTmp"], p["NoNewPrivileges"]) == ("strict", "yes", "yes")
    assert p["TemporaryFileSystem"].startswith("/dev/shm:size=1G")
    assert p["DevicePolicy"] == "closed"
    assert (p["StateDirectory"], p["CacheDirectory"]) == ("farworker", "farworker")
    assert "network-online.target" in p["After"] and "nvidia-persistenced.service" in p["After"]
    assert p["UnitFileState"] == "enabled"


@pytest.mark.parametrize("name", WORKERS)
def test_security_exposure_at_most_3(name):
    out = host(name).check_output("systemd-analyze security farworker.service 2>&1 | tail -n 1")
    exposure = float(out.split("level for farworker.service:")[1].split()[0])
    assert exposure <= 3.0, out


@pytest.fixture(scope="module")
def mesh_result():
    boot = host(BOOT)
    boot.ansible("copy", f"src={CLIENT} dest=/var/tmp/mesh_client.py mode=0644", check=False)
    peers = boot.check_output("cat /var/lib/farworker-bootstrap/bootstrap-maddrs.txt").split()
    ip = boot.check_output("hostname -I").split()[0]
    # The bootstrap peer's reachable address, then whatever it printed itself.
    reachable = [m for m in peers if f"/ip4/{ip}/" in m] or peers
    cmd = (
        "cd /var/tmp && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 timeout 300 "
        f"/opt/farworker/venv/bin/python /var/tmp/mesh_client.py --initial-peers {','.join(reachable)}"
    )
    result = boot.run(cmd)
    assert result.rc == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_workers_find_each_other_through_the_bootstrap_peer(mesh_result):
    # Blocks 0:2 and 2:4 are held by two different servers that only know the bootstrap peer.
    assert len(mesh_result["servers"]) == 2, mesh_result


def test_mesh_generation_equals_local_transformers(mesh_result):
    assert mesh_result["got"] == mesh_result["expected"], mesh_result


def test_large_forward_succeeds(mesh_result):
    assert mesh_result["forward_mb"] >= 30
    assert mesh_result["forward_finite"]
    assert mesh_result["forward_shape"][2] == 128


@pytest.mark.parametrize("name", WORKERS)
def test_dev_shm_clean_after_stop(name, mesh_result):
    h = host(name)
    # The service's tensors went to its private /dev/shm, never the host's.
    assert h.check_output("find /dev/shm -name 'torch_*' | wc -l") == "0"
    h.check_output("systemctl stop farworker")
    assert h.check_output("find /dev/shm -mindepth 1 | wc -l") == "0"
    h.check_output("systemctl reset-failed farworker; systemctl start farworker")
    assert props(h, "farworker", "ActiveState")["ActiveState"] == "active"


def _restarted_after(h, before, timeout, what):
    def ready_again():
        p = props(h, "farworker", "NRestarts", "ActiveState")
        return int(p["NRestarts"]) > before and p["ActiveState"] == "active"

    wait_for(ready_again, timeout, what)


def test_kill_9_is_restarted():
    h = host(WORKERS[0])
    h.check_output("systemctl reset-failed farworker")
    p = props(h, "farworker", "MainPID", "NRestarts")
    h.check_output(f"kill -9 {p['MainPID']}")
    _restarted_after(h, int(p["NRestarts"]), 120, "a restart after kill -9")


def test_sigstop_is_caught_by_the_watchdog():
    h = host(WORKERS[1])
    h.check_output("systemctl reset-failed farworker")
    p = props(h, "farworker", "MainPID", "NRestarts")
    started = time.monotonic()
    h.check_output(f"kill -STOP {p['MainPID']}")
    # WatchdogSec=10 counts from the last ping, and the worker pings every 5 s: the timeout comes 5-10 s after
    # the stop. Then SIGABRT (+SIGCONT, or SIGKILL after TimeoutStopSec=15) and RestartSec=2.
    wait_for(lambda: int(props(h, "farworker", "NRestarts")["NRestarts"]) > int(p["NRestarts"]), 10 + 15 + 2 + 15,
             "the watchdog restart")
    # Earlier than one ping interval would mean something other than the watchdog restarted it.
    assert time.monotonic() - started >= 5
    journal = h.check_output("journalctl -u farworker --no-pager -n 200")
    assert "Watchdog timeout" in journal
    _restarted_after(h, int(p["NRestarts"]), 120, "READY after the watchdog restart")


def test_bad_wallet_fails_with_78_and_is_not_retried():
    h = host(WORKERS[0])
    env = "/etc/farworker/farworker.env"
    h.check_output(f"cp -p {env} {env}.good && sed -i 's/^FARLABS_WALLET_ADDRESS=.*/FARLABS_WALLET_ADDRESS=\"0xnot-a-wallet\"/' {env}")
    try:
        h.check_output("systemctl reset-failed farworker")
        before = int(props(h, "farworker", "NRestarts")["NRestarts"])
        h.run("systemctl restart farworker")
        wait_for(lambda: props(h, "farworker", "ActiveState")["ActiveState"] == "failed", 60, "the unit to fail")
        time.sleep(8)  # longer than RestartSec=2: a restart loop would show by now
        p = props(h, "farworker", "ActiveState", "ExecMainStatus", "Result", "NRestarts")
        assert p["ActiveState"] == "failed" and p["ExecMainStatus"] == "78" and p["Result"] == "exit-code", p
        assert int(p["NRestarts"]) == before, p
        assert "FARLABS_WALLET_ADDRESS" in h.check_output("journalctl -u farworker --no-pager -n 30")
    finally:
        h.check_output(f"mv {env}.good {env} && systemctl reset-failed farworker && systemctl start farworker")
    assert props(h, "farworker", "ActiveState")["ActiveState"] == "active"
