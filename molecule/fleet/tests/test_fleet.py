"""The fleet under traffic: a rolling upgrade, an abrupt host stop, the kill of each coordinator replica, the ledger.

A client thread on the control node sends completions to the coordinator's /v1/completions (haproxy in front of two
replicas on one Postgres: roles/farworker_coordinator) one after another, bounded in count and time, for the whole
module. The tests run in file order and move the fleet through its phases; each request is recorded with the phase
it started in. Targets (issues 5 and 21): no failed request during the rolling upgrade, every request succeeds after
the failover, none fails or is refused while a coordinator replica is SIGKILLed and restarted (each in turn), the
ledger's tokens equal the tokens the client's completions say each worker processed (nothing lost or doubled), and a
second site.yml run after the upgrade changes nothing. What any converged mesh shows (a fresh converge's
idempotence, check mode, the unit, faults under systemd, tokens equal to local transformers) is proven once, in the
default scenario.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
inventory = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
WORKERS = sorted(inventory.get_hosts("farworker"))
BOOT = inventory.get_hosts("mesh_bootstrap")[0]
VICTIM = "fl-w2"  # serves 2:4; fl-w3 (0:4) still covers every block
USAGE_TRANSIT_S = 2.0  # a closed session's usage is in the outbox well within this (handler -> main -> SQLite)
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "tests"))  # the project's own test helpers (tests/polling.py)
import polling  # noqa: E402

MAX_REQUESTS, MAX_SECONDS = 30000, 1800  # the client loop stops by itself (~8 requests/s here)
PROMPT_TOKENS, NEW_TOKENS = (3, 9), (3, 9)  # each request's prompt length and max_tokens: randrange bounds
# The coordinator (molecule.yml, fl-boot): haproxy on 8080 in front of replicas on 127.0.0.1:8801 and 8802.
REPLICA_PORTS = (8801, 8802)
HEARTBEAT_S = 2  # farworker_coordinator_heartbeat_interval: the lease's TTL


def host(name):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


def wait_for(predicate, timeout, what, step=1.0):
    # tests/polling.py's bounded wait; each poll here is a container command, so once a second by default.
    return polling.wait_for(predicate, timeout, what, step)


def upgrade_version() -> str:
    if os.environ.get("FLEET_UPGRADE_VERSION"):
        return os.environ["FLEET_UPGRADE_VERSION"]
    wheels = glob.glob(os.path.join(os.environ["FARWORKER_FLEET_WHEELHOUSE"], "farworker-*.whl"))
    versions = sorted({os.path.basename(w).split("-")[1] for w in wheels})
    assert len(versions) >= 2, f"the fleet wheelhouse needs a newer farworker wheel: {wheels}"
    return versions[-1]


def site_yml(*extra: str) -> tuple[int, str, float]:
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    started = time.monotonic()
    args = ["ansible-playbook", "-i", INVENTORY, str(PROJECT / "playbooks" / "site.yml"), *extra]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as stuck:  # keep what it printed: the last task shows where it hung
        rc, out = -9, _text(stuck.stdout) + _text(stuck.stderr) + "\nsite.yml killed after 900 s\n"
    if rc != 0:  # assertion messages show the end of `out`: the failed tasks and the recap go last
        failed = [line for line in out.splitlines() if line.startswith(("fatal:", "failed:", "FAILED - ", "ERROR"))]
        recap_lines = out[out.rfind("PLAY RECAP"):] if "PLAY RECAP" in out else "(no recap)\n"
        out += workers_diagnostics() + "\n===== failed tasks\n" + "\n".join(f[:1500] for f in failed[-6:])
        out += "\n===== last task\n" + _last_task(out) + "\n" + recap_lines
    return rc, out, time.monotonic() - started


def _last_task(out: str) -> str:
    tasks = re.findall(r"^TASK \[(.*)\]", out, re.M)
    return tasks[-1] if tasks else "(none)"


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def workers_diagnostics(lines: int = 12, since: float | None = None) -> str:
    """What each worker's unit and journal say now (a failed site.yml run, failed requests), for the test's
    failure message. ``since``: the journal from that unix time instead of the last ``lines`` lines."""
    parts = []
    journal = f"--since @{int(since)} -o short-precise" if since else f"-o cat -n {lines}"
    for name in WORKERS:
        try:
            state = host(name).run("systemctl show farworker -p ActiveState -p SubState -p StatusText -p NRestarts"
                                   f" -p MainPID; journalctl -u farworker --no-pager {journal}")
        except Exception as err:  # noqa: BLE001 - a killed host has no journal to show
            parts.append(f"\n===== {name}: {err!r}")
            continue
        parts.append(f"\n===== {name} (rc {state.rc})\n{state.stdout[-6000:]}{state.stderr[-500:]}")
    return "".join(parts)


def failed_requests_report(traffic, failed: list[dict]) -> str:
    """The failed requests, then every worker's journal from a little before the first of them (and the
    victim's, saved before it was killed): the message a flaky failure needs to be understood."""
    if not failed:
        return ""
    since = min(r["start"] for r in failed) - 20
    report = json.dumps(failed[:5], default=str)[:3000] + workers_diagnostics(since=since)
    if traffic.victim_journal:
        report += f"\n===== {VICTIM} before the kill\n{traffic.victim_journal[-6000:]}"
    coordinator = host(BOOT).run("journalctl -u 'farworker-coordinator@*' -u haproxy -t haproxy --no-pager"
                                 f" -o short-precise --since @{int(since)}")
    return report + f"\n===== {BOOT} coordinator replicas and haproxy\n{coordinator.stdout[-6000:]}"


def recap(output: str) -> dict[str, dict[str, int]]:
    rows = {}
    for name, fields in re.findall(r"^(\S+)\s+: (ok=.*)$", output, re.M):
        rows[name] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return rows


class Traffic(threading.Thread):
    def __init__(self, url: str):
        super().__init__(name="fleet-client", daemon=True)
        self.url = url
        self.phase = "warmup"
        self.records: list[dict] = []
        self.refused = Counter()  # phase -> connection attempts the coordinator (haproxy) did not answer
        self.replica_kills = 0  # each may abort the one completion in flight (billed by the workers, then re-sent)
        self.stop_event = threading.Event()
        self.rng = random.Random(5)

    def run(self):
        started = time.monotonic()
        while not self.stop_event.is_set() and len(self.records) < MAX_REQUESTS:
            if time.monotonic() - started > MAX_SECONDS:
                break
            prompt = [self.rng.randrange(3, 500) for _ in range(self.rng.randrange(*PROMPT_TOKENS))]
            body = {"prompt": prompt, "max_tokens": self.rng.randrange(*NEW_TOKENS), "temperature": 0}
            rec = {"phase": self.phase, "start": time.time(), "prompt_len": len(prompt)}
            try:
                answer = requests.post(f"{self.url}/v1/completions", json=body, timeout=120)
            except requests.ConnectionError:
                # Nothing was accepted: haproxy is not listening (it never stops here, so this fails a test).
                self.refused[self.phase] += 1
                time.sleep(0.5)
                continue
            except requests.RequestException as err:
                rec.update(end=time.time(), ok=False, status=None, error=repr(err)[:300])
                self.records.append(rec)
                continue
            rec.update(end=time.time(), ok=answer.status_code == 200, status=answer.status_code)
            if rec["ok"]:
                data = answer.json()
                rec.update(route=data["route"], completion_tokens=data["usage"]["completion_tokens"])
            else:
                rec["error"] = answer.text[:300]
            self.records.append(rec)

    def in_phase(self, phase):
        return [r for r in self.records if r["phase"] == phase]

    def wait_successes(self, n, timeout, after=None):
        def enough():
            done = [r for r in self.records if r["ok"] and (after is None or r["start"] >= after)]
            return len(done) >= n

        wait_for(enough, timeout, f"{n} successful requests", step=0.5)


@pytest.fixture(scope="module")
def fleet():
    ip = subprocess.check_output(
        ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", BOOT], text=True
    ).strip()
    url = f"http://{ip}:8080"
    traffic = Traffic(url)
    traffic.kill_time = traffic.kill_done = traffic.victim_peer_id = traffic.victim_journal = None
    yield traffic
    traffic.stop_event.set()
    traffic.join(timeout=150)
    summary = {
        "requests": len(traffic.records),
        "by_phase": {p: [sum(r["ok"] for r in traffic.in_phase(p)), len(traffic.in_phase(p))]
                     for p in dict.fromkeys(r["phase"] for r in traffic.records)},
        "refused": dict(traffic.refused),
        "failed": [r for r in traffic.records if not r["ok"]][:10],
    }
    print("FLEET TRAFFIC " + json.dumps(summary))


def workers_view(url):
    return requests.get(f"{url}/v1/workers", timeout=10).json()["workers"]


def test_three_workers_online_and_every_block_served_twice(fleet):
    ws = wait_for(lambda: (w := workers_view(fleet.url)) and len(w) == 3 and all(x["state"] == "online" for x in w)
                  and w, 120, "three online workers")
    cover = Counter(b for w in ws for b in range(*w["blocks"]))
    assert sorted(cover) == [0, 1, 2, 3] and min(cover.values()) >= 2, cover
    fleet.start()
    fleet.wait_successes(5, 180)
    assert all(r["ok"] for r in fleet.records), [r for r in fleet.records if not r["ok"]][:3]


def test_rolling_upgrade_without_a_failed_request(fleet):
    new = upgrade_version()
    before = len(fleet.records)
    fleet.phase = "upgrade"
    rc, out, took = site_yml("-e", "farworker_serial=1", "-e", f"fleet_worker_version={new}",
                             "-e", "farworker_rolling_settle_sec=5")
    fleet.phase = "after_upgrade"
    print(f"FLEET rolling upgrade to {new}: {took:.0f} s, {len(fleet.records) - before} requests during it")
    assert rc == 0, out[-12000:]
    rows = recap(out)
    assert all(rows[w]["changed"] > 0 for w in WORKERS), rows
    assert rows[BOOT]["changed"] == 0, rows
    # serial: 1 → one "PLAY [Mesh workers]" batch per worker
    assert out.count("PLAY [Mesh workers]") == len(WORKERS), out[-3000:]
    during = fleet.in_phase("upgrade")
    assert during, "no request ran during the upgrade"
    assert all(r["ok"] for r in during), failed_requests_report(fleet, [r for r in during if not r["ok"]])
    assert fleet.refused["upgrade"] == 0
    ws = wait_for(lambda: (w := workers_view(fleet.url)) and len(w) == 3
                  and all(x["version"] == new and x["state"] == "online" for x in w) and w,
                  120, f"all workers online at {new}")
    assert len(ws) == 3
    for name in WORKERS:
        # Each worker drained (usage flushed, deregistered) before its blocks went offline. (Before the
        # unit had KillMode=mixed, systemd's SIGTERM also reached p2pd and one worker aborted mid-drain.)
        h = host(name)
        drained = h.run("journalctl -u farworker --no-pager -o cat"
                        " | grep -c -e 'Stopping: draining usage' -e 'Stopped cleanly'")
        print(f"FLEET {name}: {drained.stdout.strip()} drain log lines")
        assert int(drained.stdout.strip() or 0) >= 2, h.check_output("journalctl -u farworker --no-pager -n 60")


def test_second_site_yml_run_changes_nothing(fleet):
    """The upgrade left a fixed point. One batch: with nothing to change no worker restarts, so serial batches and
    their settle pauses would only make the run longer (68-76 s for all hosts at once, 120-185 s one by one)."""
    rc, out, took = site_yml("-e", f"fleet_worker_version={upgrade_version()}")
    print(f"FLEET idempotent site.yml rerun: {took:.0f} s")
    assert rc == 0, out[-12000:]
    rows = recap(out)
    assert rows and all(r["changed"] == 0 for r in rows.values()), rows


def test_every_request_succeeds_after_a_worker_host_stops_abruptly(fleet):
    fleet.phase = "host_killed"
    status = json.loads(host(VICTIM).check_output("cat /var/lib/farworker/status.json"))
    fleet.victim_peer_id = status["peer_id"]
    fleet.victim_journal = host(VICTIM).run("journalctl -u farworker --no-pager -o short-precise -n 150").stdout
    fleet.kill_time = time.time()
    subprocess.run(["docker", "kill", VICTIM], check=True, capture_output=True)
    fleet.kill_done = time.time()  # the SIGKILL landed somewhere in [kill_time, kill_done]
    fleet.wait_successes(10, 300, after=fleet.kill_time)
    after = [r for r in fleet.records if r["end"] >= fleet.kill_time]
    assert after and all(r["ok"] for r in after), failed_requests_report(fleet, [r for r in after if not r["ok"]])


def replica_health(port: int) -> dict | None:
    """A replica's /healthz (its lease as it sees it), read on the coordinator host; None while it does not answer."""
    probe = host(BOOT).run(
        "/opt/farworker/venv/bin/python -c 'import sys, urllib.request;"
        f" print(urllib.request.urlopen(\"http://127.0.0.1:{port}/healthz\", timeout=5).read().decode())'")
    return json.loads(probe.stdout) if probe.rc == 0 else None


def lease_holder() -> int | None:
    held = [port for port in REPLICA_PORTS if (replica_health(port) or {}).get("held")]
    return held[0] if len(held) == 1 else None


def haproxy_sessions() -> dict[str, int]:
    """Sessions haproxy has sent to each replica so far (its stats socket's `stot`, per server)."""
    stat = host(BOOT).check_output(
        "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"/run/haproxy/admin.sock\");"
        " s.sendall(b\"show stat\\n\"); print(b\"\".join(iter(lambda: s.recv(65536), b\"\")).decode())'")
    header, *rows = [line.split(",") for line in stat.splitlines() if line.strip()]
    column = header.index("stot")
    return {row[1]: int(row[column]) for row in rows if row[1].startswith("replica-")}


def kill_the_lease_holder(fleet, phase: str) -> None:
    """SIGKILL the replica holding the lease; wait for the other to take it and for systemd to bring this one back."""
    holder = wait_for(lease_holder, 30, "one replica holding the lease")
    other = next(p for p in REPLICA_PORTS if p != holder)

    def restarts() -> int:
        return int(host(BOOT).check_output(f"systemctl show -p NRestarts --value farworker-coordinator@{holder}"))

    before = restarts()
    fleet.phase = phase
    killed = time.time()
    host(BOOT).check_output(f"systemctl kill --signal=SIGKILL farworker-coordinator@{holder}")
    fleet.replica_kills += 1
    # within 2 heartbeat intervals by the rule (tests/test_replicas.py holds it to that); slack for 2 cores
    wait_for(lambda: (replica_health(other) or {}).get("held"), 2 * HEARTBEAT_S + 20,
             f"replica {other} taking the lease from the killed {holder}")
    took = time.time() - killed
    wait_for(lambda: replica_health(holder), 180, f"replica {holder} restarted by systemd and healthy")
    back = time.time() - killed
    assert restarts() == before + 1
    fleet.wait_successes(10, 300, after=killed)
    print(f"FLEET replica {holder} SIGKILLed: the lease on {other} after {took:.1f} s (polled),"
          f" {holder} healthy again after {back:.0f} s, {len(fleet.in_phase(phase))} requests")


def test_each_coordinator_replica_killed_under_traffic(fleet):
    """SIGKILL the replica holding the lease (the DHT watch runs there), let systemd restart it, then the same to the
    other: haproxy sends every completion to a live replica (re-sending the one a dead replica had not answered), the
    other replica takes the lease, and the killed one serves again."""
    for round_ in (1, 2):
        kill_the_lease_holder(fleet, f"replica_kill_{round_}")
    fleet.phase = "after_replica_kills"
    sessions_before = {port: haproxy_sessions()[f"replica-{port}"] for port in REPLICA_PORTS}
    fleet.wait_successes(5, 120, after=time.time())
    failed = [r for r in fleet.records if not r["ok"]]
    assert not failed, failed_requests_report(fleet, failed)
    assert not fleet.refused, fleet.refused  # haproxy kept listening throughout
    # both replicas served again after the kills (haproxy's leastconn spreads even a sequential client's requests)
    served = wait_for(lambda: (now := haproxy_sessions()) and all(now[f"replica-{p}"] > sessions_before[p]
                                                                   for p in REPLICA_PORTS) and now,
                      60, "requests served by both replicas after the kills")
    print(f"FLEET haproxy sessions per replica: {served}")


def test_ledger_equals_the_tokens_the_client_received(fleet):
    fleet.stop_event.set()
    fleet.join(timeout=150)
    # The killed host comes back: its outbox (usage not yet delivered) survives in its state directory.
    subprocess.run(["docker", "start", VICTIM], check=True, capture_output=True)
    expected = Counter()
    # What a host killed mid-request cannot bill: sessions still open on it, and records a just-closed
    # session had not yet committed to its outbox (in transit from the handler process, well under
    # USAGE_TRANSIT_S). Those are the victim's tokens in requests overlapping that window; nothing else.
    at_risk = 0
    for r in fleet.records:
        for span in r.get("route", []):  # a failed request has none (and an earlier test failed on it)
            expected[span["peer_id"]] += span["tokens"]
            if (span["peer_id"] == fleet.victim_peer_id and r["end"] >= fleet.kill_time - USAGE_TRANSIT_S
                    and r["start"] <= fleet.kill_done):
                at_risk += span["tokens"]
    client_total = sum(expected.values())
    # What a replica killed mid-completion adds: the workers served that session's tokens and bill them, and haproxy
    # sent the request again to the other replica, whose answer the client holds. The client is sequential, so each
    # kill aborts at most one request: at most one span per worker, of at most a prompt plus its new tokens.
    aborted_max = fleet.replica_kills * ((PROMPT_TOKENS[1] - 1) + (NEW_TOKENS[1] - 1))

    def ledger():
        return {w["peer_id"]: w["tokens_served"] for w in workers_view(fleet.url)}

    def bounds(peer):  # the ledger's tokens for a worker: [client's - lost with the killed host, client's + aborted]
        low = expected[peer] - (at_risk if peer == fleet.victim_peer_id else 0)
        return low, expected[peer] + aborted_max

    def all_arrived():
        now = ledger()
        return now if all(now.get(p, 0) >= bounds(p)[0] for p in expected) else None

    wait_for(all_arrived, 240, "the ledger to hold every token the client received", step=2)
    time.sleep(6)  # three heartbeat intervals: nothing arrives twice
    final = ledger()
    diff = {p: final.get(p, 0) - t for p, t in expected.items()}
    print(f"FLEET ledger total {sum(final.values())}, client total {client_total}: per worker {diff}"
          f" (the victim's tokens at risk at its kill: {at_risk}; at most {aborted_max} per worker from"
          f" {fleet.replica_kills} replica kills); {len(fleet.records)} requests")
    assert all(bounds(p)[0] <= final.get(p, 0) <= bounds(p)[1] for p in expected), (diff, at_risk, aborted_max)
    assert set(final) <= set(expected) | {p for p, v in final.items() if v == 0}
