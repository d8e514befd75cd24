"""monitoring/: the alert rules pass promtool's checks and unit tests (one per alert), and a real Prometheus that
scrapes a real worker and the coordinator returns data for every query of both Grafana dashboards (no panel is
empty because of a misspelt metric or label).

Prometheus and promtool are Debian's `prometheus` package (scripts/setup.sh --dev installs it). The test runs its
own prometheus binary with its own config, loopback port and storage under tmp_path; a system Prometheus, if one
runs, is not touched."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.metrics import DCGM_GAUGES
from farworker.tiny_model import TINY_MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "farworker-rules.yml"
DASHBOARDS = sorted((MONITORING / "grafana").glob("*.json"))
ALERT_NAMES = (
    "FarworkerDown", "FarworkerUnhealthy", "FarworkerQuarantined", "FarworkerUptimeLow",
    "FarworkerOutboxBacklogGrowing", "FarworkerGpuXidErrors", "FarworkerCoordinatorDown", "FarworkerWorkerOffline",
    "FarworkerWorkerUnhealthy", "FarworkerWorkerQuarantined", "FarworkerWorkerUptimeLow", "FarworkerBlockUncovered",
)
# what the GPU panels read: a CPU worker has none of these series (they need NVML)
GPU_METRICS = (*DCGM_GAUGES, "farworker_gpu_xid_errors_total")

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="prometheus/promtool missing: bash scripts/setup.sh --dev installs Debian's prometheus package")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=MONITORING)


@needs_prometheus
def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
def test_every_alert_has_a_promtool_unit_test_and_they_pass():
    tests = sorted((MONITORING / "tests").glob("*.yml"))
    tested = {name for t in tests for name in re.findall(r"alertname: (\w+)", t.read_text())}
    defined = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert defined == set(ALERT_NAMES)  # each alert the issue asks for, no more
    assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"
    result = promtool("test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, with Grafana's variables as the test's values."""
    board = json.loads(path.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$instance", ".+").replace("$__rate_interval", "15s")
            queries.append((panel["title"], expr))
    return queries


def test_dashboards_are_grafana_json_with_their_queries():
    assert {p.name for p in DASHBOARDS} == {"farworker-worker.json", "farworker-coordinator.json"}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
        assert len(dashboard_queries(path)) >= 10
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(tmp_path: Path, targets: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    jobs = "\n".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']"
                     for job, target in targets.items())
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      f"rule_files:\n  - {RULES}\nscrape_configs:\n{jobs}\n")
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    return proc, f"http://127.0.0.1:{port}"


def query(url: str, expr: str) -> list:
    answer = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def scraping(prometheus: subprocess.Popen, url: str) -> bool:
    assert prometheus.poll() is None, "prometheus exited (its log: prometheus.log in the test's tmp_path)"
    try:
        return len(query(url, "up == 1")) == 2
    except requests.ConnectionError:  # not listening yet
        return False


def targets(url: str) -> list:
    answer = requests.get(f"{url}/api/v1/targets", timeout=10).json()
    return [(t["labels"].get("job"), t["health"], t["lastError"]) for t in answer["data"]["activeTargets"]]


def is_gpu_query(expr: str) -> bool:
    return any(name in expr for name in GPU_METRICS)


@needs_prometheus
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # hivemind's P2P.__del__
def test_a_real_prometheus_gets_data_for_every_dashboard_query(tmp_path, tiny_model, bootstrap_peer, start_workers):
    settings = Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=tiny_model,
                        model_name=TINY_MODEL_NAME, initial_peers=tuple(bootstrap_peer), probe_period_s=0,
                        sample_routed=0.5, audit_share=0.5)  # their panels read their counters
    metrics_port = free_port()
    prometheus = None
    with RunningCoordinator(settings) as coordinator:
        worker = start_workers("scraped", "0:4", bootstrap_peer, api_url=coordinator.url,
                               env={"FARLABS_METRICS_PORT": str(metrics_port)})
        worker.wait_online(timeout=180)
        try:
            prometheus, url = start_prometheus(tmp_path, {
                "farworker": f"127.0.0.1:{metrics_port}",
                "farworker-coordinator": coordinator.url.removeprefix("http://"),
            })
            queries = [(path.name, title, expr) for path in DASHBOARDS for title, expr in dashboard_queries(path)]
            # both targets up, the worker's heartbeat answered, rates over two samples and the rules evaluated
            deadline = time.monotonic() + 60
            while not scraping(prometheus, url):
                assert time.monotonic() < deadline, f"Prometheus does not scrape both targets: {targets(url)}"
                time.sleep(0.5)

            def empty() -> list:
                return [(name, title, expr) for name, title, expr in queries
                        if not is_gpu_query(expr) and not query(url, expr)]

            deadline = time.monotonic() + 60
            missing = empty()
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                missing = empty()
            gpu = [expr for _, _, expr in queries if is_gpu_query(expr)]
            for expr in gpu:  # no GPU here: these parse and run, and name what the worker exports on one
                query(url, expr)
        finally:
            if prometheus is not None:
                prometheus.terminate()
                prometheus.wait(timeout=30)
    assert not missing, "dashboard queries without data:\n" + "\n".join(map(str, missing))
    assert len(gpu) >= 8 and len(queries) - len(gpu) >= 30


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_coordinator_metrics_show_coverage_gaps_and_a_quarantine(tmp_path):
    """What FarworkerBlockUncovered and FarworkerWorkerQuarantined read, from a real coordinator's /metrics."""
    from coordinator_fixtures import heartbeat, registration

    from farworker.api_client import CoordinatorClient
    from farworker.identity import Identity

    with RunningCoordinator(Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0)) as c:
        identity = Identity.generate()
        client = CoordinatorClient(c.url, identity)
        worker_id = client.register(registration(identity, blocks=(0, 2), total_blocks=4))["worker_id"]
        client.heartbeat(worker_id, heartbeat(blocks=(0, 2)))
        serving = scrape(c.url)
        c.store.record_probe(worker_id, time.time(), 0, 8, 0.5, 1e-4, "block 0 activations differ", quarantine=True)
        quarantined = scrape(c.url)

    def holders(samples):
        return [samples[("farworker_coordinator_block_holders", (("block", str(b)), ("model", TINY_MODEL_NAME)))]
                for b in range(4)]

    wid = (("worker_id", worker_id),)
    assert holders(serving) == [1, 1, 0, 0]
    assert serving[("farworker_coordinator_worker_serving", wid)] == 1
    assert serving[("farworker_coordinator_worker_quarantined", wid)] == 0
    assert serving[("farworker_coordinator_worker_uptime_new", wid)] == 1
    assert holders(quarantined) == [0, 0, 0, 0]
    assert quarantined[("farworker_coordinator_worker_quarantined", wid)] == 1
    assert quarantined[("farworker_coordinator_worker_serving", wid)] == 0
    assert quarantined[("farworker_coordinator_workers", (("state", "quarantined"),))] == 1
    assert quarantined[("farworker_coordinator_worker_state", (("state", "quarantined"), *wid))] == 1
