"""Direct traffic is paid only when a client vouches for it with signed receipts (docs/trust.md).

Real parts: a bootstrap peer, two `farworker run` workers splitting the tiny model, the reference coordinator
over HTTP with its SQLite ledger, and a direct petals client (farworker.vouching_client) that generates
through the mesh with no coordinator in the data path. The tests run in order on one mesh and keep their own
count of what each worker served (from the petals client's route), what was vouched for, and what was claimed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
import requests
from coordinator_fixtures import two_workers_serving
from hypothesis import given
from hypothesis import strategies as st
from polling import wait_for

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import load_or_create as load_identity
from farworker.local_mesh import start_bootstrap_peer
from farworker.mesh_client import MeshClient
from farworker.outbox import make_record
from farworker.receipts import ClientKey, load_or_create
from farworker.threading_policy import apply_thread_policy
from farworker.tiny_model import TINY_MODEL_NAME, ensure_tiny_checkpoint
from farworker.vouching_client import VouchingClient, post_receipts

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

INTERVAL = 1.0
UNVOUCHED_RATE = 0.25


class Mesh:
    def __init__(self, work, model, peers, client_key: ClientKey):
        self.work, self.model, self.peers, self.client_key = work, model, peers, client_key
        self.coordinator: RunningCoordinator | None = None
        self.port = 0
        self.workers = []
        self.claimed = Counter()  # peer id -> tokens its usage records claim (the route's, plus forged ones)
        self.vouched = Counter()  # peer id -> tokens the client's receipts say it served

    def start_coordinator(self, **settings) -> None:
        self.coordinator = RunningCoordinator(
            Settings(
                db_path=self.work / "coordinator.sqlite3",
                heartbeat_interval_s=INTERVAL,
                model_path=self.model,
                model_name=TINY_MODEL_NAME,
                initial_peers=tuple(self.peers),
                probe_period_s=0,  # probes are attested work: they would blur the vouched share measured here
                client_keys={self.client_key.key_id: ("tester", self.client_key.public_key_b64)},
                **settings,
            ),
            port=self.port,
        ).start()
        self.port = self.coordinator.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def views(self) -> dict[str, dict]:
        workers = requests.get(f"{self.url}/v1/workers", timeout=10).json()["workers"]
        return {w["peer_id"]: w for w in workers}

    def wait_claims_arrived(self) -> dict[str, dict]:
        """Every worker's usage records are on the ledger (they come through the workers' outboxes)."""
        expected = {peer: tokens for peer, tokens in self.claimed.items() if tokens}
        return wait_for(
            lambda: (v := self.views()) and {p: w["tokens_served"] for p, w in v.items() if w["tokens_served"]}
            == expected and v,
            60,
            f"claims == {expected}",
        )

    def peer(self, index: int) -> str:
        return self.workers[index].status()["peer_id"]

    def identity(self, index: int):
        return load_identity(self.workers[index].state_dir / "identity.key")


def expected_pay(mesh, view: dict, rate: float = 0.0) -> float:
    """The pay rule of docs/trust.md, worked out here from the worker's claims as stored: its vouched
    token-blocks (the test's own count) valued at its cheapest claims first, the rest at ``rate``."""
    span = view["blocks"][1] - view["blocks"][0]
    records = [r for r in mesh.coordinator.store.usage_records(view["worker_id"]) if r["tokens"]]
    records.sort(key=lambda r: r["earned_far"] / (r["tokens"] * span))
    budget, covered = mesh.vouched[view["peer_id"]] * span, 0.0
    for r in records:
        take = min(budget, r["tokens"] * span)
        covered += r["earned_far"] * take / (r["tokens"] * span)
        budget -= take
    return covered + rate * (sum(r["earned_far"] for r in records) - covered)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    apply_thread_policy("passive")
    work = tmp_path_factory.mktemp("receipts")
    model = ensure_tiny_checkpoint()
    bootstrap, peers = start_bootstrap_peer(work)
    mesh = Mesh(work, model, peers, load_or_create(work / "client.key"))
    with two_workers_serving(mesh, bootstrap):
        yield mesh


@pytest.fixture(scope="module")
def vouched(mesh):
    """Two generations by a direct client with a registered key, each server session vouched for."""
    client = VouchingClient(mesh.model, mesh.peers, TINY_MODEL_NAME, mesh.client_key, mesh.url)
    results = []
    try:
        for prompt, max_tokens in (([1, 37, 101, 250], 8), ([5, 6, 7], 5)):
            result = client.generate(prompt, max_tokens=max_tokens)
            assert sorted(r["id"] for r in result.receipts) == sorted(result.accepted)
            for span in result.generation.route:
                mesh.claimed[span["peer_id"]] += span["tokens"]
                mesh.vouched[span["peer_id"]] += span["tokens"]
            results.append(result)
    finally:
        client.close()
    return results


def test_a_direct_clients_receipts_pay_the_workers_that_served_it(mesh, vouched):
    route = [span for result in vouched for span in result.generation.route]
    assert {tuple(span["blocks"]) for span in route} == {(0, 2), (2, 4)}  # both workers served, no coordinator
    assert mesh.coordinator.store.completion_routes() == []  # nothing was routed by the coordinator
    views = mesh.wait_claims_arrived()
    for peer, view in views.items():
        assert view["tokens_attested"] == 0
        assert view["tokens_vouched"] == mesh.vouched[peer] > 0
        assert view["unvouched_tokens"] == 0
        assert view["claimed_far"] > 0
        assert view["earnings_far"] == pytest.approx(view["claimed_far"])  # every claimed token vouched for


def test_a_worker_replaying_another_workers_receipt_earns_nothing_for_it(mesh, vouched):
    """Worker 2 (blocks 2:4) got hold of a receipt worker 1 (blocks 0:2) earned, and tries every way to be
    paid for it: deliver it again, a copy naming itself, a copy it re-signs, and a claim for the same session."""
    victim, cheat = mesh.peer(0), mesh.peer(1)
    stolen = next(r for r in vouched[0].receipts if r["peer_id"] == victim)
    before = mesh.wait_claims_arrived()

    again = post_receipts(mesh.url, [stolen])  # delivered twice: counts once
    assert again == {"accepted": [stolen["id"]], "duplicates": []}

    renamed = dict(stolen, peer_id=cheat, blocks=[2, 4])  # names the cheat, keeps the client's signature
    answer = requests.post(f"{mesh.url}/v1/receipts", json={"receipts": [renamed]}, timeout=10)
    assert answer.status_code == 401 and answer.json()["field"] == "receipts.0.signature", answer.text

    own_key = ClientKey.generate()  # the cheat signs the copy itself: its key is no registered client's
    resigned = own_key.sign(dict(renamed, id=str(uuid.uuid4())))
    answer = requests.post(f"{mesh.url}/v1/receipts", json={"receipts": [resigned]}, timeout=10)
    assert answer.status_code == 403 and answer.json()["field"] == "receipts.0.client_key_id", answer.text

    # a second receipt for the same server session, even correctly signed, vouches for nothing more
    twin = mesh.client_key.sign(dict(stolen, id=str(uuid.uuid4())))
    assert post_receipts(mesh.url, [twin]) == {"accepted": [], "duplicates": [twin["id"]]}

    # the cheat claims the stolen session as its own work, with a correctly signed usage record
    cheat_client = CoordinatorClient(mesh.url, mesh.identity(1))
    forged = make_record(stolen["session_id"], (2, 4), stolen["tokens"], steps=stolen["tokens"],
                         started_at=time.time() - 5)
    assert cheat_client.send_usage(before[cheat]["worker_id"], [forged]) == [forged["id"]]
    mesh.claimed[cheat] += stolen["tokens"]

    after = mesh.wait_claims_arrived()
    for peer in (victim, cheat):
        assert after[peer]["tokens_vouched"] == before[peer]["tokens_vouched"] == mesh.vouched[peer]
    assert after[cheat]["unvouched_tokens"] == stolen["tokens"]
    # 0 for the replay: the cheat's pay did not rise (its vouched token-blocks are now valued at its cheapest claims)
    assert after[cheat]["earnings_far"] <= before[cheat]["earnings_far"] * (1 + 1e-9)
    assert after[cheat]["earnings_far"] == pytest.approx(expected_pay(mesh, after[cheat]))
    assert after[victim]["earnings_far"] == pytest.approx(before[victim]["earnings_far"])  # counted once


def test_receipts_from_unregistered_keys_or_changed_after_signing_are_refused(mesh, vouched):
    store = mesh.coordinator.store
    genuine = vouched[1].receipts[0]
    stored = store.counts()["receipts"]

    stranger = ClientKey.generate().sign(dict(genuine, id=str(uuid.uuid4()), session_id=str(uuid.uuid4())))
    inflated = dict(genuine, id=str(uuid.uuid4()), session_id=str(uuid.uuid4()))
    inflated = dict(mesh.client_key.sign(inflated), tokens=genuine["tokens"] * 1000)  # changed after signing
    fresh = mesh.client_key.sign(dict(genuine, id=str(uuid.uuid4()), session_id=str(uuid.uuid4())))

    answer = requests.post(f"{mesh.url}/v1/receipts", json={"receipts": [stranger]}, timeout=10)
    assert answer.status_code == 403, answer.text
    body = answer.json()
    assert body["code"] == "unregistered_client" and body["field"] == "receipts.0.client_key_id"
    assert "not a client key registered" in body["error"]

    # a good receipt beside a bad one: the batch is refused whole, naming the bad one
    answer = requests.post(f"{mesh.url}/v1/receipts", json={"receipts": [fresh, inflated]}, timeout=10)
    assert answer.status_code == 401, answer.text
    body = answer.json()
    assert body["code"] == "bad_signature" and body["field"] == "receipts.1.signature"
    assert "changed after signing" in body["error"]

    answer = requests.post(f"{mesh.url}/v1/receipts", json={"receipts": [dict(genuine, tokens=10**12)]}, timeout=10)
    assert answer.status_code == 422 and answer.json()["field"] == "receipts.0.tokens", answer.text
    outside = mesh.client_key.sign(dict(genuine, id=str(uuid.uuid4()), session_id="s", blocks=[2, 9]))
    answer = requests.post(f"{mesh.url}/v1/receipts", json={"receipts": [outside]}, timeout=10)
    assert answer.status_code == 422 and answer.json()["field"] == "receipts.0.blocks", answer.text

    assert store.counts()["receipts"] == stored  # nothing refused was stored


def test_direct_traffic_without_receipts_is_shown_and_paid_only_at_the_operators_rate(mesh, vouched):
    client = MeshClient(mesh.model, mesh.peers, TINY_MODEL_NAME)  # a direct client that files no receipts
    unvouched = Counter()
    try:
        for span in client.generate([9, 8, 7, 6], max_tokens=6, temperature=0).route:
            unvouched[span["peer_id"]] += span["tokens"]
            mesh.claimed[span["peer_id"]] += span["tokens"]
    finally:
        client.close()
    views = mesh.wait_claims_arrived()
    for peer, view in views.items():
        assert unvouched[peer] > 0
        assert view["unvouched_tokens"] == mesh.claimed[peer] - mesh.vouched[peer]
        assert view["earnings_far"] == pytest.approx(expected_pay(mesh, view))
        assert 0 < view["earnings_far"] < view["claimed_far"]

    mesh.coordinator.stop()  # the operator chooses to pay unvouched traffic at a rate
    mesh.start_coordinator(pay_unvouched_rate=UNVOUCHED_RATE)
    for peer, view in mesh.views().items():
        assert view["unvouched_tokens"] == mesh.claimed[peer] - mesh.vouched[peer]
        unpaid_before = views[peer]["claimed_far"] - views[peer]["earnings_far"]
        assert view["earnings_far"] == pytest.approx(expected_pay(mesh, view, UNVOUCHED_RATE))
        assert view["earnings_far"] == pytest.approx(views[peer]["earnings_far"] + UNVOUCHED_RATE * unpaid_before)



def test_farworker_generate_files_receipts_the_coordinator_counts(mesh, vouched):
    """The command line path: `farworker generate` with the registered key, then with a key file that is not one."""
    import subprocess

    from farworker.local_mesh import base_env, farworker_command

    store = mesh.coordinator.store
    stored = store.counts()["receipts"]
    before = mesh.views()
    args = ["generate", "--coordinator", mesh.url, "--initial-peers", ",".join(mesh.peers),
            "--model-path", str(mesh.model), "--model-name", TINY_MODEL_NAME, "--max-tokens", "4"]
    done = subprocess.run(farworker_command(*args, "--key", str(mesh.work / "client.key"), "Hello mesh"),
                          env=base_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()  # the completion
    filed = store.counts()["receipts"] - stored
    assert filed >= 2 and f"{filed} of {filed} receipts counted" in done.stderr
    after = mesh.views()
    assert all(after[p]["tokens_vouched"] > before[p]["tokens_vouched"] for p in after)

    not_a_key = mesh.work / "not-a-key.pem"
    not_a_key.write_text("hello\n")
    done = subprocess.run(farworker_command(*args, "--key", str(not_a_key), "Hello mesh"), env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 78 and "not an unencrypted PEM private key" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_the_coordinator_refuses_a_bad_client_keys_file(tmp_path):
    from click.testing import CliRunner

    from farworker.coordinator.command import coordinator_command

    keys = tmp_path / "client-keys"
    keys.write_text(f"alice {ClientKey.generate().public_key_b64}\nbob not-base64!\n")
    result = CliRunner().invoke(coordinator_command, ["--client-keys", str(keys), "--db", str(tmp_path / "c.db")])
    assert result.exit_code == 78, result.output
    assert "line 2: not a base64 Ed25519 public key" in result.output


def test_covered_token_blocks_are_valued_at_the_cheapest_claims_first():
    from farworker.coordinator.services.ledger import paid_far

    claims = [(10, 1.0), (10, 3.0)]  # (token-blocks, $FAR), cheapest first: 0.1 and 0.3 $FAR per token-block
    assert paid_far(claims, 20, 10) == pytest.approx(1.0)  # half covered: the cheap half
    assert paid_far(claims, 20, 15) == pytest.approx(1.0 + 1.5)
    assert paid_far(claims, 20, 40) == pytest.approx(4.0)  # never more than claimed
    assert paid_far(claims, 20, 0) == 0.0
    assert paid_far(claims, 20, 10, unvouched_rate=0.5) == pytest.approx(1.0 + 0.5 * 3.0)
    assert paid_far([], 0, 10) == 0.0


@pytest.fixture(scope="module")
def bare_coordinator(tmp_path_factory):
    """A coordinator without a mesh (receipts need none), with one registered client key."""
    key = ClientKey.generate()
    path = tmp_path_factory.mktemp("receipts-fuzz") / "coordinator.sqlite"
    settings = Settings(db_path=path, model_blocks={TINY_MODEL_NAME: 4},
                        client_keys={key.key_id: ("fuzzer", key.public_key_b64)})
    with RunningCoordinator(settings) as running:
        yield running, key


def _receipt(key: ClientKey) -> dict:
    return key.sign({"id": str(uuid.uuid4()), "peer_id": "Qm" + "a" * 44, "blocks": [0, 2], "tokens": 12,
                     "session_id": str(uuid.uuid4()), "model": TINY_MODEL_NAME, "created_at": int(time.time())})


def test_any_receipt_field_gets_a_4xx_never_a_5xx_and_refused_batches_store_nothing(bare_coordinator):
    """Each field of a valid receipt replaced by arbitrary JSON, signed again by the registered key (so the
    value reaches every check after the signature) or not."""
    from test_coordinator_fuzz import FUZZ, VALUE  # the coordinator fuzz test's values and settings

    coordinator, key = bare_coordinator
    fields = sorted(_receipt(key))

    @FUZZ
    @given(field=st.sampled_from(fields), value=VALUE, resign=st.booleans())
    def check(field, value, resign):
        receipt = dict(_receipt(key), **{field: value})
        if resign and field not in ("signature", "client_key_id"):
            receipt = key.sign(receipt)
        before = coordinator.store.counts()
        body = json.dumps({"receipts": [receipt]})
        answer = requests.post(f"{coordinator.url}/v1/receipts", data=body, timeout=10,
                               headers={"Content-Type": "application/json"})
        assert answer.status_code < 500, (receipt, answer.status_code, answer.text[:500])
        if answer.status_code >= 400:
            assert answer.json()["error"] and answer.json()["field"], answer.text
            assert coordinator.store.counts() == before, receipt

    check()
