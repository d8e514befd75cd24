"""The mesh page (GET /), driven in a real browser: Playwright's Python API with Debian's chromium, headless, against a
real coordinator and two real `farworker run` workers splitting the tiny model.

The page must show every block covered, a completion's route, a quarantined worker's reason and a killed worker
going offline, all without a reload (its own script refreshes it), and show a hostile location as text with no
script run: jinja2 escapes it, and the CSP header runs no script the page did not serve.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import requests
from coordinator_fixtures import heartbeat, registration, signed_post, two_workers_serving
from polling import wait_for
from shm_files import TreePids

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.services.ledger import OFFLINE_AFTER_INTERVALS, OFFLINE_SLACK_S
from farworker.identity import load_or_create
from farworker.local_mesh import DEMO_WALLET, start_bootstrap_peer
from farworker.shm_cleanup import remove_files_of
from farworker.threading_policy import apply_thread_policy
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download is not reachable (docs/facts)
INTERVAL = 1.0  # short heartbeats: a killed worker is offline after OFFLINE_AFTER_INTERVALS of them (+ slack)
SEE = 30.0  # how long the page gets to show what the coordinator already knows (a refresh is ~1 interval)
# Markup in a worker's location: shown as text, never run. Each part would set the flag and open a dialog if run.
HOSTILE = '<script>window.__xss=1;alert(1)</script><img src=x onerror="window.__xss=2;alert(2)">'
HOSTILE_WALLET = "0x" + "ab" * 20  # coordinator_fixtures.registration's
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


class Mesh:
    def __init__(self, work: Path, model: Path, peers: list[str]):
        self.work, self.model, self.peers = work, model, peers
        self.coordinator: RunningCoordinator | None = None
        self.workers = []

    def start_coordinator(self) -> RunningCoordinator:
        self.coordinator = RunningCoordinator(Settings(
            db_path=self.work / "coordinator.sqlite3",
            heartbeat_interval_s=INTERVAL,
            model_path=self.model,
            model_name=TINY_MODEL_NAME,
            initial_peers=tuple(self.peers),
            # every routed completion's first step on one worker is recomputed (the worker page lists them); no
            # timed probe within the test (quarantine goes through the verdict path below), no session audits
            probe_period_s=3600,
            sample_routed=1.0,
            audit_share=0,
            hide_wallets=True,
        )).start()
        return self.coordinator

    @property
    def url(self) -> str:
        return self.coordinator.url

    def worker_ids(self) -> dict[tuple[int, int], str]:
        """{span: worker id} of the real workers."""
        workers = requests.get(f"{self.url}/v1/workers", timeout=10).json()["workers"]
        return {tuple(w["blocks"]): w["worker_id"] for w in workers if w["location"] != HOSTILE and w["blocks"]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: bash scripts/setup.sh --dev installs Debian's chromium")
    apply_thread_policy("passive")
    work = tmp_path_factory.mktemp("page")
    bootstrap, peers = start_bootstrap_peer(work)
    mesh = Mesh(work, ensure_tiny_checkpoint(), peers)
    with two_workers_serving(mesh, bootstrap):
        yield mesh


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        driver = [p for p in psutil.Process().children() if "playwright" in " ".join(p.cmdline())]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()
            # The coordinator's petals client forks this process (hivemind's DHT) after the driver started: the
            # fork holds the driver's stdin open, so the driver never sees it close and Playwright's exit waits
            # forever. End the driver itself (by the pid it started with); its output then ends and exit returns.
            for process in driver:
                process.terminate()


class Tab:
    """A page in its own browser context, with every dialog and console error it saw."""

    def __init__(self, browser, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))

    def open(self, url: str):
        answer = self.page.goto(url)
        assert answer.status == 200, answer.text()
        # a mark the page keeps until it is reloaded: what the page shows later came from its own refresh
        self.page.evaluate("window.__loaded_once = true")
        return answer

    def not_reloaded(self) -> bool:
        return self.page.evaluate("window.__loaded_once === true")

    def wait(self, expression: str, arg=None, timeout: float = SEE) -> None:
        # Polled from here, not with page.wait_for_function: that re-evaluates a string predicate with eval() inside
        # the page, which the page's CSP (no 'unsafe-eval') refuses, so it failed whenever the predicate was not
        # already true at its first look. page.evaluate goes through the devtools protocol, outside the CSP.
        wait_for(lambda: self.page.evaluate(expression, arg), timeout, f"the page to show: {expression}")


@pytest.fixture
def tab(browser):
    tabs = []

    def open_tab(**context) -> Tab:
        tabs.append(Tab(browser, **context))
        return tabs[-1]

    yield open_tab
    for t in tabs:
        t.context.close()


def holders(tab: Tab) -> list[int]:
    return tab.page.eval_on_selector_all(".strip .block", "cells => cells.map(c => Number(c.dataset.holders))")


def test_every_block_is_shown_covered_and_the_page_runs_only_its_own_scripts(mesh, tab):
    t = tab()
    answer = t.open(mesh.url + "/")
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp and "'unsafe-inline'" not in csp, csp
    assert answer.headers["x-content-type-options"] == "nosniff"
    t.wait("document.querySelectorAll('tr.worker[data-state=online]').length >= 2")
    assert holders(t) == [1, 1, 1, 1]  # the tiny model's 4 blocks, split 0:2 and 2:4
    assert t.page.locator(".strip .block.gap").count() == 0
    assert "all 4 blocks covered" in t.page.inner_text("#coverage")
    # each worker's throughput as it announces it in the DHT (the coordinator's DHT watch reads it; "–" until then)
    t.wait("[...document.querySelectorAll('tr.worker[data-state=online] td.throughput')]"
           ".every(td => parseFloat(td.textContent) > 0)")
    announced = {w["worker_id"]: w["announced_throughput"]
                 for w in requests.get(f"{mesh.url}/v1/workers", timeout=10).json()["workers"]}
    assert all(figure and figure > 0 for figure in announced.values()), announced
    # the page's own script and style came from the coordinator; nothing else was loaded
    assert t.page.evaluate("[...document.scripts].map(s => new URL(s.src).pathname)") == ["/static/page.js"]
    assert t.errors == [] and t.dialogs == []


def test_a_completion_appears_in_the_last_routes_without_a_reload(mesh, tab):
    t = tab(viewport={"width": 1280, "height": 900})
    t.open(mesh.url + "/")
    answer = requests.post(f"{mesh.url}/v1/completions", json={"prompt": [1, 37, 101, 250], "max_tokens": 4},
                           timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    t.wait("id => document.querySelector(`.route[data-completion-id='${id}']`) !== null", body["id"])
    hops = t.page.eval_on_selector_all(f".route[data-completion-id='{body['id']}'] .hops li",
                                       "items => items.map(i => [i.dataset.workerId, i.textContent])")
    assert [worker for worker, _ in hops] == [span["worker_id"] for span in body["route"]]
    for (_, text), span in zip(hops, body["route"], strict=True):
        assert f"blocks {span['blocks'][0]}:{span['blocks'][1]}" in text and f"{span['tokens']} tokens" in text
    assert t.not_reloaded()
    assert t.errors == [] and t.dialogs == []

    # the sampled check of that completion: on the checked worker's page, with its error against the tolerance
    checked = wait_for(lambda: [w["worker_id"] for w in requests.get(f"{mesh.url}/v1/workers", timeout=10).json()[
        "workers"] if w["routed_checks"]], SEE, "the completion's routed check")
    worker_page = tab(viewport={"width": 1280, "height": 900})
    worker_page.open(f"{mesh.url}/workers/{checked[0]}")
    worker_page.wait("document.querySelector('#routed-checks tr.routed-check.passed') !== null")
    cells = worker_page.page.eval_on_selector_all("#routed-checks tr.routed-check.passed:first-child td",
                                                  "cells => cells.map(c => c.textContent.trim())")
    span = next(s["blocks"] for s in body["route"] if s["worker_id"] == checked[0])
    assert cells[1] == f"{span[0]}:{span[1]}" and cells[6] == "passed", cells
    assert float(cells[3]) <= float(cells[4]), cells  # the error, under the tolerance
    screenshots(t, mesh, worker_page)


def screenshots(desktop: Tab, mesh, worker_page: Tab) -> None:
    """The page on a desktop and on a phone, and a worker's page, for the docs: to $FARWORKER_PAGE_SCREENSHOTS
    (e.g. docs/img) if set."""
    folder = os.environ.get("FARWORKER_PAGE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    desktop.page.screenshot(path=str(Path(folder) / "mesh-page-desktop.png"), full_page=True)
    worker_page.page.screenshot(path=str(Path(folder) / "mesh-page-worker.png"), full_page=True)
    phone = Tab(desktop.context.browser, **PHONE)
    try:
        phone.open(mesh.url + "/")
        phone.page.screenshot(path=str(Path(folder) / "mesh-page-phone.png"), full_page=True)
    finally:
        phone.context.close()


@pytest.fixture(scope="module")
def hostile_worker(mesh, tmp_path_factory):
    """A worker registered through the signed API with markup in its location. It says it is still joining, so it
    holds no block on the strip whatever order the tests run in."""
    identity = load_or_create(tmp_path_factory.mktemp("hostile") / "key")
    answer = signed_post(mesh.url, identity, "/v1/workers/register", {**registration(identity), "location": HOSTILE})
    assert answer.status_code == 200, answer.text
    worker_id = answer.json()["worker_id"]
    assert signed_post(mesh.url, identity, f"/v1/workers/{worker_id}/heartbeat",
                       heartbeat(state="joining")).status_code == 200
    return worker_id


def test_a_hostile_location_shows_as_text_and_runs_nothing(mesh, tab, hostile_worker):
    t = tab()
    t.open(mesh.url + "/")
    row = f"tr[data-worker-id='{hostile_worker}']"
    t.wait("row => document.querySelector(row) !== null", row)  # the first page may predate it: the refresh
    assert t.page.inner_text(f"{row} .location") == HOSTILE
    t.page.wait_for_timeout(2500)  # two more refreshes: the fragment goes through innerHTML each time
    assert t.page.locator(f"{row} img, {row} script").count() == 0
    assert t.page.evaluate("window.__xss") is None and t.dialogs == []

    t.open(f"{mesh.url}/workers/{hostile_worker}")
    assert t.page.inner_text("#worker .location") == HOSTILE
    assert t.page.evaluate("window.__xss") is None and t.dialogs == []
    # wallets are shortened (the coordinator runs with hide_wallets): no full address on either page
    assert t.page.inner_text("#worker .wallet") == "0xabab…abab"
    t.open(mesh.url + "/")
    for wallet in (HOSTILE_WALLET, DEMO_WALLET):
        assert wallet[:6] in t.page.content() and wallet not in t.page.content()


def test_a_quarantined_worker_shows_its_reason(mesh, tab, hostile_worker):
    """Quarantined the way a failed probe or routed check does it (spot_check.record_verdict), while the page
    is open; its worker page shows the probe's error against the tolerance."""
    from farworker.coordinator.spot_check import ProbeResult, record_verdict

    t = tab()
    t.open(mesh.url + "/")
    row = f"tr[data-worker-id='{hostile_worker}']"
    t.wait("row => document.querySelector(row) !== null", row)
    reason = "block 1 activations differ from the reference: relative error 0.37 > 0.001"
    app = mesh.coordinator.app
    record_verdict(mesh.coordinator.store, app.state.mesh, hostile_worker,
                   ProbeResult(block=1, tokens=8, error=0.37, tolerance=1e-3, problem=reason), wrong=True)
    t.wait("row => document.querySelector(row)?.dataset.state === 'quarantined'", row)
    assert t.page.inner_text(f"{row} .reason") == reason
    assert t.not_reloaded()

    t.open(f"{mesh.url}/workers/{hostile_worker}")
    assert reason in t.page.inner_text("#worker")
    probe = t.page.inner_text("#probes tr.probe.failed")
    assert "0.37" in probe and "0.001" in probe and "370.00" in probe and reason in probe


@pytest.mark.faults
def test_a_killed_worker_turns_offline_on_the_open_page(mesh, tab):
    """SIGKILL of the worker serving 2:4: its row turns offline and blocks 2 and 3 turn into gaps, with no reload,
    once the coordinator's offline rule (services/ledger.is_offline) says so."""
    victim_id = mesh.worker_ids()[(2, 4)]
    victim = next(w for w in mesh.workers if w.proc.name == "worker2")
    t = tab()
    t.open(f"{mesh.url}/")
    row = f"tr[data-worker-id='{victim_id}']"
    t.wait("row => document.querySelector(row)?.dataset.state === 'online'", row)
    tree = TreePids(victim.proc.process.pid)
    try:
        victim.proc.kill()
    finally:
        remove_files_of(tree.close())  # its torch_* files in /dev/shm: a killed worker cannot remove its own
    bound = OFFLINE_AFTER_INTERVALS * INTERVAL + OFFLINE_SLACK_S + SEE
    t.wait("row => document.querySelector(row)?.dataset.state === 'offline'", row, timeout=bound)
    wait_for(lambda: holders(t) == [1, 1, 0, 0], SEE, "blocks 2 and 3 shown as gaps")
    assert t.page.locator(".strip .block.gap").count() == 2
    assert t.not_reloaded()


# -- without a browser or a mesh: the page's rules and its answers to bad requests ---------------------------------
def view(worker_id: str, state: str, blocks, healthy: bool = True):
    from farworker.coordinator.schemas.ledger import WorkerView

    return WorkerView.model_construct(worker_id=worker_id, state=state, blocks=blocks,
                                      last_heartbeat={"state": state, "healthy": healthy})


def test_coverage_counts_only_workers_that_serve_their_span():
    from farworker.coordinator.services.mesh_page import coverage

    workers = [
        view("a", "online", [0, 3]),
        view("b", "online", [2, 5]),
        view("c", "offline", [0, 6]),  # silent for 3 intervals
        view("d", "quarantined", [0, 6]),
        view("e", "online", [5, 6], healthy=False),  # its own beat says it is unhealthy
        view("f", "joining", [4, 6]),  # still loading
        view("g", "online", None),  # span not known yet
    ]
    assert [cell["holders"] for cell in coverage(workers, 6)] == [1, 1, 2, 1, 1, 0]
    assert coverage(workers, None) == []


@pytest.fixture(scope="module")
def bare_coordinator(tmp_path_factory):
    """A coordinator without a mesh (no petals), 2 workers of one host and one more, wallets hidden."""
    work = tmp_path_factory.mktemp("bare")
    running = RunningCoordinator(Settings(db_path=work / "c.sqlite3", heartbeat_interval_s=30,
                                          model_blocks={TINY_MODEL_NAME: 4}, hide_wallets=True)).start()
    try:
        ids = []
        for i, (host, instance, span) in enumerate([("h-" + "1" * 16, 0, (0, 2)), ("h-" + "1" * 16, 1, (2, 4)),
                                                    (None, None, (0, 4))]):
            identity = load_or_create(work / f"key{i}")
            body = {**registration(identity, blocks=span), "wallet_address": "0x" + f"{i + 1:02d}" * 20}
            if host:
                body.update(host_id=host, instance=instance)
            answer = signed_post(running.url, identity, "/v1/workers/register", body)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["worker_id"])
            beat = signed_post(running.url, identity, f"/v1/workers/{ids[-1]}/heartbeat", heartbeat(blocks=span))
            assert beat.status_code == 200, beat.text
        yield running, ids
    finally:
        running.stop()


def test_the_page_shows_hosts_hides_wallets_and_carries_its_headers(bare_coordinator):
    running, ids = bare_coordinator
    for path in ("/", "/fragments/mesh", f"/workers/{ids[0]}", f"/fragments/workers/{ids[0]}", "/static/page.js"):
        answer = requests.get(running.url + path, timeout=10)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["content-security-policy"].startswith("default-src 'self'; script-src 'self';"), path
        assert "<script>" not in answer.text and " style=" not in answer.text and " on" + "click" not in answer.text
    page = requests.get(running.url + "/", timeout=10).text
    assert 'data-host-id="h-1111111111111111"' in page and "2 of 2" in page  # the two-GPU host; the lone one not
    assert page.count('data-host-id="') == 1
    for i in (1, 2, 3):
        assert "0x" + f"{i:02d}" * 20 not in page and "0x" + f"{i:02d}" * 2 + "…" + f"{i:02d}" * 2 in page
    assert page.count('class="block covered"') == 4  # two holders each: the lone worker and one of the host's


@pytest.mark.parametrize("path", ["/workers/w-unknown", "/fragments/workers/w-unknown", "/static/nothing.js",
                                  "/static/page.py", "/static/..%2Fcoordinator%2Fweb%2Ftemplates%2Fbase.html"])
def test_a_page_that_does_not_exist_is_a_one_line_404(bare_coordinator, path):
    running, _ = bare_coordinator
    answer = requests.get(running.url + path, timeout=10)
    assert answer.status_code == 404, answer.text
    body = answer.json()  # ours, naming what is missing; a path with a slash is no route at all (FastAPI's own)
    assert "\n" not in body.get("error", body.get("detail")) and "{%" not in answer.text
