"""The fleet on systemd containers: service health, files, the mesh, and the faults systemd must handle.

Tests run in file order: the mesh tests, then the ones that restart the bootstrap peer or run ansible-playbook
against a worker again (a bad value must leave the running worker alone), then the fault checks, which come
last and leave each worker active again.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
import yaml

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
inventory = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
WORKERS = sorted(inventory.get_hosts("farworker"))
BOOT = inventory.get_hosts("mesh_bootstrap")[0]
MESH_CHECK = os.path.join(os.path.dirname(__file__), "..", "files", "mesh_check.py")
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "tests"))  # the project's own test helpers (tests/polling.py)
import polling  # noqa: E402

ENV_FILE = "/etc/farworker/farworker.env"
BOOTSTRAP_MADDRS = "/var/lib/farworker-bootstrap/bootstrap-maddrs.txt"


def host(name):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


def props(h, unit, *names):
    out = h.check_output(f"systemctl show {unit} " + " ".join(f"--property={n}" for n in names))
    return dict(line.split("=", 1) for line in out.splitlines())


def prop_values(h, unit, name):
    """Every value of a property systemctl prints once per entry (DeviceAllow=...)."""
    out = h.check_output(f"systemctl show {unit} --property={name}")
    return [line.split("=", 1)[1] for line in out.splitlines() if line.startswith(f"{name}=")]


def wait_for(predicate, timeout, what):
    # tests/polling.py's bounded wait; each poll here is a container command, so once a second.
    return polling.wait_for(predicate, timeout, what, step=1.0)


def role_defaults(role):
    return yaml.safe_load((PROJECT / "roles" / role / "defaults" / "main.yml").read_text())


def setting(name, variable):
    """A farworker variable as this host gets it: molecule's inventory, else the role default."""
    return inventory.get_variables(name).get(variable, role_defaults("farworker")[variable])


def timespan(seconds):
    """Seconds as systemctl show prints a time span: 900 -> 15min, 90 -> 1min 30s."""
    rest, parts = int(seconds), []
    for unit, size in (("h", 3600), ("min", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts) or "0"


def ansible_playbook(playbook, *extra, timeout=240):
    """Run a playbook against molecule's containers from the verifier, as molecule's converge runs it."""
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    # One stream: ansible prints failures to stderr, and section() needs them under their task's heading.
    proc = subprocess.run(["ansible-playbook", "-i", INVENTORY, str(playbook), *extra], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout, check=False)
    return proc.returncode, proc.stdout


def section(output, heading):
    """The lines ansible-playbook printed under one TASK/RUNNING HANDLER heading."""
    start = output.find(heading)
    assert start >= 0, f"{heading!r} not in the output:\n{output[-4000:]}"
    end = min(i for i in (output.find("\nTASK [", start + 1), output.find("\nRUNNING HANDLER [", start + 1),
                          output.find("\nPLAY RECAP", start + 1), len(output)) if i >= 0)
    return output[start:end]


def recap(output):
    return {name: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
            for name, fields in re.findall(r"^(\S+)\s+: (ok=.*)$", output, re.M)}


def env_file_state(h):
    return h.check_output(f"stat -c '%U:%G %a %s %Y' {ENV_FILE} && sha256sum {ENV_FILE}")


@pytest.mark.parametrize("role", ["farworker", "mesh_bootstrap", "farworker_package"])
def test_role_variables_declared_and_documented(role):
    """Every default is declared in meta/argument_specs.yml with the same default, and the README lists it."""
    defaults = role_defaults(role)
    options = yaml.safe_load((PROJECT / "roles" / role / "meta" / "argument_specs.yml").read_text())[
        "argument_specs"]["main"]["options"]
    readme = (PROJECT / "roles" / role / "README.md").read_text()
    assert sorted(defaults) == sorted(k for k, o in options.items() if not o.get("required"))
    for name, option in options.items():
        assert name.startswith(f"{role}_"), name
        if "default" in option:
            assert option["default"] == defaults[name], name
        assert re.search(rf"^\| `{name}` \|", readme, re.M), f"{name} is not in {role}/README.md's table"


def host_has_nvidia_pci_device():
    """Containers see the machine's PCI devices: what the driver role's probe reads there."""
    return any(p.read_text().strip() == "0x10de" for p in Path("/sys/bus/pci/devices").glob("*/vendor"))


def test_check_run_on_the_converged_fleet_changes_nothing():
    """`site.yml --check --diff`, as operators run it before a change: changed=0 on every host, no worker restarted,
    and the driver role's "no NVIDIA GPU" only where the PCI probe (run under --check too) finds none."""
    before = {name: props(host(name), "farworker", "MainPID")["MainPID"] for name in WORKERS}
    rc, out = ansible_playbook(PROJECT / "playbooks" / "site.yml", "--check", "--diff")
    assert rc == 0, out[-4000:]
    changed = {name: counts["changed"] for name, counts in recap(out).items()}
    assert sorted(changed) == sorted([BOOT, *WORKERS]) and set(changed.values()) == {0}, (changed, out[-4000:])
    assert "RUNNING HANDLER" not in out, out[-4000:]
    skipped = set(re.findall(r"no NVIDIA GPU \([^)]*\)\s+on (\S+):", out))
    assert skipped == (set() if host_has_nvidia_pci_device() else set(WORKERS)), skipped
    assert {name: props(host(name), "farworker", "MainPID")["MainPID"] for name in WORKERS} == before


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
    pushed = [name for name in WORKERS if inventory.get_variables(name).get("farworker_package_wheelhouse_src")]
    assert pushed, "no worker in the inventory sets farworker_package_wheelhouse_src"
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


def test_coordinator_set_only_where_the_coordinator_runs():
    """The role installs the worker alone (no FastAPI, uvicorn, starlette); the coordinator's host has them, and a
    worker's `farworker coordinator` says which extra it lacks in one line instead of a traceback."""
    probe = "/opt/farworker/venv/bin/python -c 'import importlib.util as u; print(u.find_spec(\"{}\") is not None)'"
    for name in WORKERS:
        h = host(name)
        assert [h.check_output(probe.format(m)) for m in ("fastapi", "uvicorn", "starlette")] == ["False"] * 3, name
        refused = h.run("/opt/farworker/venv/bin/farworker coordinator --port 18999")
        assert refused.rc != 0 and "farworker[coordinator]" in refused.stderr, refused
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    boot = host(BOOT)
    assert [boot.check_output(probe.format(m)) for m in ("fastapi", "uvicorn")] == ["True", "True"]
    assert props(boot, "farworker-coordinator", "ActiveState")["ActiveState"] == "active"


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
              "StartLimitBurst", "StartLimitIntervalUSec", "TimeoutStartUSec", "TimeoutStopUSec", "LimitNOFILE",
              "User", "ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "TemporaryFileSystem",
              "DevicePolicy", "StateDirectory", "CacheDirectory", "After", "Wants", "UnitFileState")
    assert p["NotifyAccess"] == "main"
    assert p["WatchdogUSec"] == "10s"
    assert p["Restart"] == "on-failure"
    assert "78" in p["RestartPreventExitStatus"]
    # molecule's inventory leaves these at the role defaults (900 s, 600 s, 5): the real sizes
    assert p["TimeoutStartUSec"] == timespan(setting(name, "farworker_timeout_start_sec")) == "15min"
    assert p["StartLimitIntervalUSec"] == timespan(setting(name, "farworker_start_limit_interval_sec")) == "10min"
    assert p["StartLimitBurst"] == str(setting(name, "farworker_start_limit_burst")) == "5"
    assert p["TimeoutStopUSec"] == "15s"
    assert p["LimitNOFILE"] == "65536"
    assert p["User"] == "farworker"
    assert (p["ProtectSystem"], p["ProtectHome"], p["PrivateTmp"], p["NoNewPrivileges"]) == (
        "strict", "yes", "yes", "yes")
    assert p["TemporaryFileSystem"].startswith("/dev/shm:size=1G")
    # Only the NVIDIA character device groups, and /dev/rtc read-only (ProtectClock=yes adds it), besides the
    # standard pseudo devices DevicePolicy=closed keeps.
    assert p["DevicePolicy"] == "closed"
    assert sorted(" ".join(v.split()) for v in prop_values(h, "farworker", "DeviceAllow")) == [
        "char-nvidia-caps r", "char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-rtc r"]
    assert (p["StateDirectory"], p["CacheDirectory"]) == ("farworker", "farworker")
    after = p["After"].split()
    assert "network-online.target" in after and "nvidia-persistenced.service" in after, p["After"]
    assert "network-online.target" in p["Wants"].split(), p["Wants"]
    assert p["UnitFileState"] == "enabled"


@pytest.mark.parametrize("name", WORKERS)
def test_security_exposure_at_most_3(name):
    out = host(name).check_output("systemd-analyze security farworker.service 2>&1 | tail -n 1")
    exposure = float(out.split("level for farworker.service:")[1].split()[0])
    assert exposure <= 3.0, out


@pytest.fixture(scope="module")
def mesh_result():
    return run_mesh_check()


def run_mesh_check() -> dict:
    """A petals client on the bootstrap host generates through both workers and compares with transformers."""
    boot = host(BOOT)
    boot.ansible("copy", f"src={MESH_CHECK} dest=/var/tmp/mesh_check.py mode=0644", check=False)
    peers = boot.check_output("cat /var/lib/farworker-bootstrap/bootstrap-maddrs.txt").split()
    ip = boot.check_output("hostname -I").split()[0]
    # The bootstrap peer's reachable address, then whatever it printed itself.
    reachable = [m for m in peers if f"/ip4/{ip}/" in m] or peers
    cmd = (
        "cd /var/tmp && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 timeout 300 "
        f"/opt/farworker/venv/bin/python /var/tmp/mesh_check.py --initial-peers {','.join(reachable)}"
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


def test_bootstrap_identity_survives_a_restart():
    """The bootstrap peer's peer id (and so the multiaddr every worker was given) is the same after a restart.

    Restarting the only bootstrap peer hides blocks from new clients for a while: this runs after the mesh tests.
    """
    h = host(BOOT)

    def peer_ids():
        return set(re.findall(r"/p2p/([1-9A-HJ-NP-Za-km-z]+)", h.file(BOOTSTRAP_MADDRS).content_string))

    before = peer_ids()
    assert len(before) == 1, before
    (peer,) = before
    p = props(h, "farworker-bootstrap", "MainPID", "StatusText", "InvocationID")
    assert p["StatusText"] == f"bootstrap peer {peer}", p
    # The service writes the file at every start: without it, a stale file would prove nothing.
    h.check_output(f"rm -f {BOOTSTRAP_MADDRS} && systemctl restart farworker-bootstrap")  # returns after READY
    q = props(h, "farworker-bootstrap", "ActiveState", "MainPID", "StatusText", "InvocationID")
    assert q["ActiveState"] == "active" and q["MainPID"] != p["MainPID"] and q["InvocationID"] != p["InvocationID"], q
    assert peer_ids() == before
    assert q["StatusText"] == f"bootstrap peer {peer}", q
    # What the new run logged and printed (journald may file the stream a moment after READY).
    journal = f"journalctl _SYSTEMD_INVOCATION_ID={q['InvocationID']} --no-pager -o cat"
    wait_for(lambda: f"bootstrap peer {peer}" in (out := h.check_output(journal)) and f"/p2p/{peer}" in out, 30,
             f"the new run's journal to name peer {peer}")


def test_bad_role_value_fails_validation_and_the_worker_keeps_running():
    """site.yml with a malformed wallet: the env file's validation fails, the file and the process stay."""
    name = WORKERS[0]
    h = host(name)
    env_before = env_file_state(h)
    p = props(h, "farworker", "ActiveState", "MainPID", "NRestarts")
    assert p["ActiveState"] == "active", p
    # The bootstrap play is outside --limit: give the worker the peers it has, so only the wallet differs.
    peers = re.search(r'^FARLABS_DHT_BOOTSTRAP="(.*)"$', h.file(ENV_FILE).content_string, re.M).group(1)
    rc, out = ansible_playbook(PROJECT / "playbooks" / "site.yml", "--limit", name,
                               "-e", "farworker_wallet_address=0xnot-a-wallet",
                               "-e", json.dumps({"farworker_dht_bootstrap": peers.split(",")}))
    assert rc != 0, out[-4000:]
    assert recap(out)[name]["failed"] == 1, out[-4000:]
    failed = section(out, "TASK [farworker : Write the env file]")
    assert f"fatal: [{name}]" in failed and "failed to validate" in failed, failed
    # farworker check --config-only names the field, the value and the accepted form.
    assert "FARLABS_WALLET_ADDRESS='0xnot-a-wallet' is invalid: expected 0x followed by 40 hex digits" in failed, failed
    assert "FARLABS_DHT_BOOTSTRAP" not in failed, failed  # the wallet is the only bad value
    assert "RUNNING HANDLER" not in out, out[-4000:]
    assert env_file_state(h) == env_before
    assert 'FARLABS_WALLET_ADDRESS="0x1111111111111111111111111111111111111111"' in h.file(ENV_FILE).content_string
    q = props(h, "farworker", "ActiveState", "MainPID", "NRestarts")
    assert q == p, (p, q)


PACKAGE_CHANGE_PLAY = """
- name: A package change meets an env file the installed package rejects
  hosts: {host}
  become: true
  gather_facts: false
  vars:
    _farworker_service_managed: true
  tasks:
    - name: Load the farworker role (its preflight checks only; its handlers are under test)
      ansible.builtin.import_role:
        name: farworker
        tasks_from: preflight.yml
    - name: Report a package change, as the install tasks do
      ansible.builtin.command: /bin/true
      changed_when: true
      notify: farworker package changed
"""


def test_package_change_checks_the_config_before_restarting():
    """A new package restarts the worker only after `farworker check --config-only` accepts the env file."""
    name = WORKERS[0]
    h = host(name)
    h.check_output(f"cp -p {ENV_FILE} {ENV_FILE}.good && sed -i "
                   f"'s/^FARLABS_WALLET_ADDRESS=.*/FARLABS_WALLET_ADDRESS=\"0xnot-a-wallet\"/' {ENV_FILE}")
    try:
        p = props(h, "farworker", "ActiveState", "MainPID", "NRestarts")
        assert p["ActiveState"] == "active", p
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as play:
            play.write(PACKAGE_CHANGE_PLAY.format(host=name))
            play.flush()
            rc, out = ansible_playbook(play.name)
        assert rc != 0, out[-4000:]
        check = section(out, "RUNNING HANDLER [farworker : Check the farworker configuration with the installed"
                             " package]")
        assert f"fatal: [{name}]" in check and "FARLABS_WALLET_ADDRESS='0xnot-a-wallet' is invalid" in check, check
        assert "RUNNING HANDLER [farworker : Restart farworker]" not in out, out[-4000:]
        assert props(h, "farworker", "ActiveState", "MainPID", "NRestarts") == p
    finally:
        h.check_output(f"mv {ENV_FILE}.good {ENV_FILE}")
        h.run("systemctl is-active --quiet farworker"
              " || { systemctl reset-failed farworker; systemctl start farworker; }")
    assert props(h, "farworker", "ActiveState")["ActiveState"] == "active"


REQUIREMENT_FILE = "/opt/farworker/farworker.txt"  # written by the install tasks (farworker_package_dir)


def test_configure_tag_pushes_an_env_change_without_touching_the_venv():
    """`--tags farworker_configure`: the new value reaches the env file and the restarted worker; no install task runs.

    The marker line in the install tasks' requirement file would be rewritten by any install task that ran."""
    name = WORKERS[1]
    h = host(name)
    marker = "# left alone by --tags farworker_configure"
    original = h.check_output(f"cat {REQUIREMENT_FILE}")
    h.check_output(f"cp -p {REQUIREMENT_FILE} {REQUIREMENT_FILE}.orig && echo '{marker}' >> {REQUIREMENT_FILE}")
    venv_before = h.check_output("find /opt/farworker/venv -newer /opt/farworker/farworker.txt | wc -l")
    env_before = env_file_state(h)
    peers = re.search(r'^FARLABS_DHT_BOOTSTRAP="(.*)"$', h.file(ENV_FILE).content_string, re.M).group(1)
    interval = int(setting(name, "farworker_heartbeat_interval"))
    p = props(h, "farworker", "MainPID", "InvocationID")
    try:
        rc, out = ansible_playbook(PROJECT / "playbooks" / "site.yml", "--limit", name, "--tags", "farworker_configure",
                                   "-e", f"farworker_heartbeat_interval={interval + 1}",
                                   "-e", json.dumps({"farworker_dht_bootstrap": peers.split(",")}))
        assert rc == 0, out[-4000:]
        tasks = re.findall(r"^TASK \[([^\]]+)\]", out, re.M)
        assert "farworker : Write the env file" in tasks, tasks
        assert "farworker : Install the farworker package" not in tasks, tasks
        assert not [t for t in tasks if t.startswith("farworker_package : ")], tasks
        assert "changed: [" in section(out, "TASK [farworker : Write the env file]")
        assert "changed: [" in section(out, "RUNNING HANDLER [farworker : Restart farworker]")
        assert f'FARLABS_HEARTBEAT_INTERVAL="{interval + 1}"' in h.file(ENV_FILE).content_string
        assert h.check_output(f"tail -n 1 {REQUIREMENT_FILE}") == marker, "an install task rewrote the requirements"
        assert h.check_output("find /opt/farworker/venv -newer /opt/farworker/farworker.txt | wc -l") == venv_before
        q = props(h, "farworker", "ActiveState", "MainPID", "InvocationID")
        assert q["ActiveState"] == "active" and q["InvocationID"] != p["InvocationID"], (p, q)
        running = h.check_output(f"cat /proc/{q['MainPID']}/environ | tr '\\0' '\\n'")
        assert f"FARLABS_HEARTBEAT_INTERVAL={interval + 1}" in running.splitlines()
    finally:
        h.check_output(f"mv {REQUIREMENT_FILE}.orig {REQUIREMENT_FILE}")
        rc, out = ansible_playbook(PROJECT / "playbooks" / "site.yml", "--limit", name, "--tags", "farworker_configure",
                                   "-e", json.dumps({"farworker_dht_bootstrap": peers.split(",")}))
        assert rc == 0, out[-4000:]
    assert h.check_output(f"cat {REQUIREMENT_FILE}") == original
    assert env_file_state(h).split()[-2] == env_before.split()[-2]  # the same content (sha256) as before
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


# The worker's processes, from /proc (the image has no procps): the DHT process is the child with children (its
# p2pd); a connection handler is a forked child of the same name without children.
# (`; true`: the loop's status is its last test's, false whenever the last child is not of the kind.)
CHILD_OF_KIND = {
    "dht": 'for c in $(cat /proc/{pid}/task/*/children); do [ -n "$(cat /proc/$c/task/*/children)" ] && echo $c;'
           ' done; true',
    "handler": 'for c in $(cat /proc/{pid}/task/*/children); do [ "$(cat /proc/$c/comm)" = "$(cat /proc/{pid}/comm)" ]'
               ' && [ -z "$(cat /proc/$c/task/*/children)" ] && echo $c; done; true',
}


@pytest.mark.parametrize("kind", ["dht", "handler"])
def test_a_dead_child_ends_in_a_prompt_restart_and_serving(kind):
    """kill -9 of one of the worker's processes: seen at the next health check (5 s), usage kept, exit 70, and
    Restart=on-failure brings it back to READY at once (not after the watchdog's or a stop timeout)."""
    h = host(WORKERS[0])
    h.check_output("systemctl reset-failed farworker")
    p = props(h, "farworker", "MainPID", "NRestarts")
    victims = h.check_output(CHILD_OF_KIND[kind].format(pid=p["MainPID"])).split()
    assert victims, f"no {kind} process under {p['MainPID']}"
    killed = time.monotonic()
    h.check_output(f"kill -9 {victims[-1]}")
    _restarted_after(h, int(p["NRestarts"]), 120, f"READY after the {kind} process died")
    back = time.monotonic() - killed
    journal = h.check_output("journalctl -u farworker --no-pager -n 300")
    assert "Exiting with status 70 so the service is restarted: child process" in journal, journal[-3000:]
    assert back < 5 + 23 + 2 + 60, f"back to READY after {back:.0f} s"  # detection + stop + RestartSec + start
    result = run_mesh_check()
    assert result["got"] == result["expected"], result


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
