"""The reference coordinator over real HTTP on loopback with a real SQLite file."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
from coordinator_fixtures import GPU_READING, heartbeat, registration, signed_post

from farworker.api_client import CoordinatorClient, CoordinatorError
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.services import ledger, uptime
from farworker.identity import HEADER_PEER_ID, Identity
from farworker.outbox import make_record


@pytest.fixture(scope="module")
def keys():
    return [Identity.generate() for _ in range(3)]


@pytest.fixture
def coordinator(tmp_path):
    with RunningCoordinator(
        Settings(db_path=tmp_path / "coordinator.sqlite", heartbeat_interval_s=2.0, max_body_bytes=64 * 1024)
    ) as running:
        yield running


@pytest.fixture
def worker(coordinator, keys):
    """(identity, worker_id) of a registered worker."""
    client = CoordinatorClient(coordinator.url, keys[0])
    answer = client.register(registration(keys[0]))
    return keys[0], answer["worker_id"]


def usage_record(tokens=10, blocks=(0, 2)):
    return make_record("sess-1", blocks, tokens=tokens, steps=2, started_at=time.time() - 2)


def attest(coordinator, peer_id: str, blocks, tokens: int) -> None:
    """What /v1/completions records after its petals client generated through this peer's span."""
    route = [{"peer_id": peer_id, "worker_id": None, "blocks": list(blocks), "tokens": tokens}]
    coordinator.store.record_completion(f"cmpl-{uuid.uuid4().hex}", time.time(), "farworker-tiny-llama", 1, 1, route)


# --- round trip ----------------------------------------------------------------------------------------
def test_register_heartbeat_usage_ledger(coordinator, keys):
    client = CoordinatorClient(coordinator.url, keys[0])
    answer = client.register(registration(keys[0], blocks=(0, 2), total_blocks=4))
    assert answer["heartbeat_interval"] == 2.0
    worker_id = answer["worker_id"]
    assert client.register(registration(keys[0]))["worker_id"] == worker_id  # a restart keeps the id

    beat = client.heartbeat(worker_id, heartbeat(gpus=[GPU_READING], tokens=30))
    assert beat["reliability"] == 1.0 and beat["uptime_pct"] == 100.0
    assert beat["earn_rate_far_per_hour"] == 0.0

    records = [usage_record(10), usage_record(20)]
    assert sorted(client.send_usage(worker_id, records)) == sorted(r["id"] for r in records)
    # sent again (a crash before the outbox heard the answer): acknowledged again, counted once
    assert sorted(client.send_usage(worker_id, records + [records[0]])) == sorted(r["id"] for r in records)

    view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()
    assert view["tokens_served"] == 30
    expected = ledger.earned_far(30, share=2 / 4, reliability=1.0, far_per_token=ledger.DEFAULT_FAR_PER_TOKEN)
    # claims alone pay nothing: no completion of the coordinator's routed anything to this worker
    assert view["claimed_far"] == pytest.approx(expected)
    assert (view["earnings_far"], view["tokens_attested"], view["unattested_tokens"]) == (0, 0, 30)
    # the coordinator's own completion saw it serve those 30 tokens on its span: now they pay
    attest(coordinator, keys[0].peer_id, (0, 2), 30)
    view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()
    assert view["earnings_far"] == pytest.approx(expected) and view["unattested_tokens"] == 0
    # the beat came in the registration's own interval, which the registration already counts
    assert view["state"] == "online" and view["blocks"] == [0, 2] and view["heartbeat_count"] == 0
    assert view["last_heartbeat"]["gpus"][0]["temperature_c"] == 41.0
    assert view["last_heartbeat"]["counters"]["tokens_processed"] == 30
    assert view["peer_id"] == keys[0].peer_id
    assert client.heartbeat(worker_id, heartbeat())["earn_rate_far_per_hour"] > 0

    listing = requests.get(f"{coordinator.url}/v1/workers", timeout=5).json()["workers"]
    assert [w["worker_id"] for w in listing] == [worker_id]

    client.deregister(worker_id)
    assert requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()["state"] == "offline"
    assert requests.get(f"{coordinator.url}/v1/workers/w-nope", timeout=5).status_code == 404


def test_uptime_formula():
    # judged over completed slots from the first up slot, the current one once it is up
    assert ledger.uptime_basis(None, 0, False) == 0 and ledger.uptime_fraction(0, 0) == 1.0  # just registered
    assert ledger.uptime_basis(None, ledger.NEW_WORKER_INTERVALS, False) == 0  # never up: not judged yet
    assert ledger.uptime_basis(None, 9, False) == 8  # then over slots 1..8 (0 is the registration's)
    assert ledger.uptime_fraction(0, 8) == 0.0
    assert ledger.uptime_basis(4, 10, False) == 6 and ledger.uptime_basis(4, 10, True) == 7
    assert ledger.uptime_fraction(3, 6) == pytest.approx(0.5)
    assert ledger.uptime_fraction(50, 6) == 1.0
    assert ledger.is_new(None, 100) and ledger.is_new(4, ledger.NEW_WORKER_INTERVALS - 1)
    assert not ledger.is_new(4, ledger.NEW_WORKER_INTERVALS)


def test_fast_beats_do_not_buy_uptime(coordinator, worker):
    identity, worker_id = worker
    client = CoordinatorClient(coordinator.url, identity)
    for _ in range(5):  # all in the registration's own interval, which the registration already counts
        client.heartbeat(worker_id, heartbeat())
    view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()
    assert view["heartbeat_count"] == 0
    assert len(coordinator.store.heartbeats(worker_id)) == 5
    time.sleep(coordinator.settings.heartbeat_interval_s)  # the next interval: one beat of it counts
    for _ in range(3):
        client.heartbeat(worker_id, heartbeat())
    assert requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()["heartbeat_count"] == 1


def test_uptime_is_observed_not_bought_by_beating_fast(ledger_db, keys):
    """A worker on a 30 s interval beats every 15 s for 30 minutes, then falls silent: at the hour it was up
    about half of it (it was 100 % when every half interval counted), and it shows offline."""
    from farworker.coordinator.store import Store

    store = Store(ledger_db)  # SQLite and Postgres
    t0 = 1_800_000_000.0
    worker_id = store.register(registration(keys[0]), t0, 30.0)
    for k in range(1, 121):
        store.heartbeat(worker_id, heartbeat(), t0 + 15 * k)
    row = store.worker_row(worker_id)
    up = uptime.observe(store, row, with_dht=False, now=t0 + 3600)
    assert (up.up, up.basis, up.new) == (60, 119, False)  # slots 1..60 of the completed 1..119
    assert up.fraction == pytest.approx(60 / 119)
    assert ledger.is_offline(row["last_heartbeat_at"], t0 + 3600, 30.0)
    assert not ledger.is_offline(row["last_heartbeat_at"], t0 + 1800 + 30, 30.0)
    store.close()


def test_unhealthy_beats_do_not_count_as_uptime(coordinator, worker):
    identity, worker_id = worker
    client = CoordinatorClient(coordinator.url, identity)
    interval = coordinator.settings.heartbeat_interval_s
    sick = {**heartbeat(), "healthy": False, "health_reason": "runtime task stuck for 130 s"}
    for _ in range(2):  # spaced so that each would count if it were healthy
        client.heartbeat(worker_id, sick)
        time.sleep(interval / 2 + 0.1)
    view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()
    assert view["heartbeat_count"] == 0
    assert view["last_heartbeat"]["healthy"] is False
    assert view["last_heartbeat"]["health_reason"] == "runtime task stuck for 130 s"
    client.heartbeat(worker_id, heartbeat())  # healthy again (the field's default)
    assert requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()["heartbeat_count"] == 1


def test_usage_of_another_worker_is_not_acknowledged(coordinator, keys, worker):
    identity, worker_id = worker
    other = CoordinatorClient(coordinator.url, keys[1])
    other_id = other.register(registration(keys[1], blocks=(2, 4)))["worker_id"]
    record = usage_record(5)
    assert CoordinatorClient(coordinator.url, identity).send_usage(worker_id, [record]) == [record["id"]]
    assert other.send_usage(other_id, [record]) == []
    assert [r["worker_id"] for r in coordinator.store.usage_records()] == [worker_id]


# --- security: each refused, nothing stored -----------------------------------------------------------
def _attempts(coordinator, keys, worker_id):
    """(name, thunk) pairs: each sends one forged or broken heartbeat for ``worker_id``."""
    me, stranger = keys[0], keys[2]
    path = f"/v1/workers/{worker_id}/heartbeat"
    url = coordinator.url
    body = heartbeat()

    def unsigned():
        return requests.post(url + path, json=body, timeout=10)

    def other_key():  # a stranger signs, claiming our peer id
        return signed_post(url, stranger, path, body, headers={HEADER_PEER_ID: me.peer_id})

    def unregistered_key():  # an honest signature of a key the coordinator never saw
        return signed_post(url, stranger, path, body)

    def stale():
        return signed_post(url, me, path, body, timestamp=int(time.time()) - 120)

    def future():
        return signed_post(url, me, path, body, timestamp=int(time.time()) + 120)

    def tampered_body():
        return signed_post(url, me, path, heartbeat(tokens=10**9), sign_body=json.dumps(body).encode())

    def other_path():
        return signed_post(url, me, path, body, sign_path=f"/v1/workers/{worker_id}/usage")

    return [unsigned, other_key, unregistered_key, stale, future, tampered_body, other_path]


def test_forged_heartbeats_refused_nothing_stored(coordinator, keys, worker):
    _, worker_id = worker
    before = coordinator.store.counts()
    for attempt in _attempts(coordinator, keys, worker_id):
        response = attempt()
        assert response.status_code == 401, (attempt.__name__, response.text)
        assert response.json()["error"], attempt.__name__
    assert coordinator.store.counts() == before
    assert (
        requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()["last_heartbeat"] is None
    )


def test_replayed_request_refused_once_counted(coordinator, worker):
    identity, worker_id = worker
    path = f"/v1/workers/{worker_id}/usage"
    body = json.dumps({"records": [usage_record(7)]}).encode()
    headers = {"Content-Type": "application/json", **identity.sign("POST", path, body)}
    first = requests.post(coordinator.url + path, data=body, headers=headers, timeout=10)
    assert first.status_code == 200
    before = coordinator.store.counts()
    replay = requests.post(coordinator.url + path, data=body, headers=headers, timeout=10)
    assert replay.status_code == 401 and replay.json()["code"] == "replay"
    assert coordinator.store.counts() == before
    # the same replay of a heartbeat
    hb_path = f"/v1/workers/{worker_id}/heartbeat"
    hb = json.dumps(heartbeat()).encode()
    hb_headers = {"Content-Type": "application/json", **identity.sign("POST", hb_path, hb)}
    assert (
        requests.post(coordinator.url + hb_path, data=hb, headers=hb_headers, timeout=10).status_code == 200
    )
    assert (
        requests.post(coordinator.url + hb_path, data=hb, headers=hb_headers, timeout=10).status_code == 401
    )
    assert len(coordinator.store.heartbeats(worker_id)) == 1


def test_worker_cannot_report_for_another(coordinator, keys, worker):
    _, worker_id = worker
    intruder = keys[1]
    CoordinatorClient(coordinator.url, intruder).register(registration(intruder))
    before = coordinator.store.counts()
    response = signed_post(
        coordinator.url, intruder, f"/v1/workers/{worker_id}/usage", {"records": [usage_record()]}
    )
    assert response.status_code == 403
    assert coordinator.store.counts() == before


def test_registration_must_prove_the_key(coordinator, keys):
    owner, thief = keys[0], keys[1]
    path = "/v1/workers/register"
    # thief registers owner's public key, signing with its own key and peer id
    stolen = registration(owner)
    r = signed_post(coordinator.url, thief, path, stolen)
    assert r.status_code == 401, r.text
    # thief claims owner's peer id, signs with thief's key
    r = signed_post(coordinator.url, thief, path, stolen, headers={HEADER_PEER_ID: owner.peer_id})
    assert r.status_code == 401, r.text
    # body peer id differs from the (valid) signing key
    mixed = dict(registration(thief), peer_id=owner.peer_id)
    r = signed_post(coordinator.url, thief, path, mixed)
    assert r.status_code == 403, r.text
    # unsigned
    assert requests.post(coordinator.url + path, json=registration(owner), timeout=10).status_code == 401
    assert coordinator.store.counts()["workers"] == 0


@pytest.mark.parametrize(
    "change,field",
    [
        ({"wallet_address": "0xnope"}, "wallet_address"),
        ({"blocks": [3, 1]}, "blocks"),
        ({"blocks": [0]}, "blocks"),
        ({"hardware": {"gpus": "many"}}, "hardware.gpus"),
        ({"model_name": ""}, "model_name"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_malformed_registration_names_the_field(coordinator, keys, change, field):
    body = dict(registration(keys[0]), **change)
    r = signed_post(coordinator.url, keys[0], "/v1/workers/register", body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert field.split(".")[0] in r.json()["error"]
    assert coordinator.store.counts()["workers"] == 0


@pytest.mark.parametrize(
    "path_tail,payload,field",
    [
        ("heartbeat", dict(heartbeat(), state="sleeping"), "state"),
        (
            "heartbeat",
            dict(
                heartbeat(),
                counters={"requests": -1, "inference_steps": 0, "tokens_processed": 0, "errors": 0},
            ),
            "counters.requests",
        ),
        (
            "heartbeat",
            dict(heartbeat(), gpus=[{"index": 0, "utilization_pct": 250}]),
            "gpus.0.utilization_pct",
        ),
        ("usage", {"records": []}, "records"),
        ("usage", {"records": [dict(make_record("s", (0, 2), 1, 1, 5.0, 6.0), id="x")]}, "records.0.id"),
        (
            "usage",
            {"records": [dict(make_record("s", (0, 2), 1, 1, 5.0, 6.0), tokens="ten")]},
            "records.0.tokens",
        ),
        (
            "usage",
            {"records": [make_record("s", (0, 2), 1, 1, 5.0, 6.0), {"id": str(uuid.uuid4())}]},
            "records.1.session_id",
        ),
        # a dishonest or broken worker's numbers: before the bounds, 2^63 tokens was an HTTP 500 (SQLite
        # OverflowError) and 10^12 tokens was credited 1e9 $FAR
        ("usage", {"records": [dict(make_record("s", (0, 2), 1, 1, 5.0, 6.0), tokens=2**63)]}, "records.0.tokens"),
        ("usage", {"records": [dict(make_record("s", (0, 2), 1, 1, 5.0, 6.0), tokens=10**12)]}, "records.0.tokens"),
        ("usage", {"records": [dict(make_record("s", (0, 2), 1, 1, 5.0, 6.0), steps=2**70)]}, "records.0.steps"),
        ("usage", {"records": [dict(make_record("s", (0, 2), 1, 1, 5.0, 6.0), ended_at=1e300)]}, "records.0.ended_at"),
        (
            "heartbeat",
            dict(heartbeat(), counters={"requests": 0, "inference_steps": 0, "tokens_processed": 2**64, "errors": 0}),
            "counters.tokens_processed",
        ),
    ],
)
def test_malformed_worker_payloads_store_nothing(coordinator, worker, path_tail, payload, field):
    identity, worker_id = worker
    before = coordinator.store.counts()
    r = signed_post(coordinator.url, identity, f"/v1/workers/{worker_id}/{path_tail}", payload)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert coordinator.store.counts() == before


def test_not_json_and_oversize(coordinator, worker):
    identity, worker_id = worker
    path = f"/v1/workers/{worker_id}/usage"
    before = coordinator.store.counts()
    r = signed_post(coordinator.url, identity, path, b"{not json")
    assert r.status_code == 422 and r.json()["error"]
    # over the 64 KiB limit, declared in Content-Length
    big = {"records": [make_record("s" * 200, (0, 2), 1, 1, 5.0, 6.0) for _ in range(400)]}
    r = signed_post(coordinator.url, identity, path, big)
    assert r.status_code == 413 and "bytes" in r.json()["error"]
    # and streamed without a length (chunked)
    data = json.dumps(big).encode()
    chunks = (data[i : i + 8192] for i in range(0, len(data), 8192))
    headers = {"Content-Type": "application/json", **identity.sign("POST", path, data)}
    r = requests.post(coordinator.url + path, data=chunks, headers=headers, timeout=10)
    assert r.status_code == 413
    assert coordinator.store.counts() == before


# --- the client's errors ---------------------------------------------------------------------------------
def test_client_errors_are_one_type_with_a_clear_message(coordinator, keys):
    client = CoordinatorClient(coordinator.url, keys[2])
    with pytest.raises(CoordinatorError, match="register first") as err:
        client.heartbeat("w-none", heartbeat())
    assert err.value.status == 401 and err.value.needs_registration and not err.value.retryable
    dead = CoordinatorClient("http://127.0.0.1:9", keys[2], timeout=2)
    with pytest.raises(CoordinatorError, match="cannot reach") as err:
        dead.register(registration(keys[2]))
    assert err.value.retryable and err.value.status is None


def test_completions_without_a_model_is_503(coordinator):
    r = requests.post(coordinator.url + "/v1/completions", json={"prompt": [1, 2, 3]}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"
    r = requests.post(coordinator.url + "/v1/completions", json={"prompt": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert requests.get(coordinator.url + "/v1/models", timeout=10).json() == {"object": "list", "data": []}


# --- a worker registered before it knows its blocks ----------------------------------------------------
def test_joining_worker_without_blocks_then_online(coordinator, keys):
    """A worker registers at start, before its weights are downloaded: blocks null, the model's size
    unknown. Its joining heartbeats say what it is doing; its first online heartbeat brings the span, and
    registering again (same worker id) the model's size."""
    client = CoordinatorClient(coordinator.url, keys[0])
    early = dict(registration(keys[0]), blocks=None, total_blocks=None, quant_type="auto", announce_maddrs=[])
    worker_id = client.register(early)["worker_id"]

    def view():
        return requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()

    first = view()
    assert first["blocks"] is None and first["total_blocks"] is None and first["state"] == "joining"
    assert first["announce_maddrs"] == [] and first["last_heartbeat"] is None
    assert first["earn_rate_far_per_hour"] == 0.0 and first["tokens_served"] == 0
    assert requests.get(f"{coordinator.url}/v1/workers", timeout=5).json()["workers"][0]["blocks"] is None

    downloading = dict(heartbeat(state="joining"), blocks=None, phase="downloading weights: 1.20 of 13.48 GB (9%)")
    answer = client.heartbeat(worker_id, downloading)
    assert answer["reliability"] == 1.0 and answer["earn_rate_far_per_hour"] == 0.0
    joining = view()
    assert joining["state"] == "joining" and joining["blocks"] is None
    assert joining["last_heartbeat"]["phase"] == "downloading weights: 1.20 of 13.48 GB (9%)"

    # usage before any span was reported: the record's own span is all the coordinator knows (share 1)
    record = usage_record(10, blocks=(0, 2))
    assert client.send_usage(worker_id, [record]) == [record["id"]]
    expected = ledger.earned_far(10, share=1.0, reliability=1.0, far_per_token=ledger.DEFAULT_FAR_PER_TOKEN)
    assert view()["claimed_far"] == pytest.approx(expected)

    client.heartbeat(worker_id, heartbeat(state="online", blocks=(0, 2)))
    online = view()
    assert online["state"] == "online" and online["blocks"] == [0, 2] and online["total_blocks"] == 2
    assert online["last_heartbeat"]["phase"] is None

    assert client.register(registration(keys[0], blocks=(0, 2), total_blocks=4))["worker_id"] == worker_id
    again = view()
    assert again["blocks"] == [0, 2] and again["total_blocks"] == 4
    assert again["announce_maddrs"] == ["/ip4/127.0.0.1/tcp/31337"]
    assert [b["state"] for b in coordinator.store.heartbeats(worker_id)] == ["joining", "online"]


def test_registration_must_state_its_blocks_even_if_unknown(coordinator, keys):
    """`blocks` is required and nullable: null says "not known yet", a missing field is a broken client."""
    body = registration(keys[0])
    del body["blocks"]
    r = signed_post(coordinator.url, keys[0], "/v1/workers/register", body)
    assert r.status_code == 422 and r.json()["field"] == "blocks", r.text
    assert coordinator.store.counts()["workers"] == 0


# The workers table as ledgers before registration-at-start wrote it (blocks NOT NULL), with the tables
# that refer to it.
_LEDGER_BEFORE_NULL_BLOCKS = """
CREATE TABLE workers (
    worker_id TEXT PRIMARY KEY,
    peer_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    wallet_address TEXT NOT NULL,
    model_name TEXT NOT NULL,
    block_start INTEGER NOT NULL,
    block_end INTEGER NOT NULL,
    total_blocks INTEGER,
    torch_dtype TEXT NOT NULL,
    quant_type TEXT NOT NULL,
    location TEXT NOT NULL,
    farworker_version TEXT NOT NULL,
    announce_maddrs TEXT NOT NULL,
    hardware TEXT NOT NULL,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_registered_at REAL NOT NULL,
    heartbeat_interval REAL NOT NULL,
    heartbeat_count INTEGER NOT NULL DEFAULT 0,
    counted_beat_at REAL,
    last_heartbeat_at REAL,
    last_heartbeat TEXT
);
CREATE TABLE heartbeats (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    received_at REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE usage (
    id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    session_id TEXT NOT NULL,
    block_start INTEGER NOT NULL,
    block_end INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    received_at REAL NOT NULL,
    share REAL NOT NULL,
    reliability REAL NOT NULL,
    earned_far REAL NOT NULL
);
INSERT INTO workers VALUES ('w-old', 'QmOldPeer', 'key', '0xabc', 'farworker-tiny-llama', 0, 2, 4, 'float32',
    'none', 'Test Lab', '0.1.0', '[]', '{}', 'online', 100.0, 100.0, 2.0, 3, 104.0, 104.0, NULL);
INSERT INTO heartbeats (worker_id, received_at, payload) VALUES ('w-old', 104.0, '{"state": "online"}');
INSERT INTO usage VALUES ('u-1', 'w-old', 's', 0, 2, 7, 1, 101.0, 102.0, 102.0, 0.5, 1.0, 0.0035);
"""


def test_a_ledger_from_before_null_blocks_opens_and_takes_joining_workers(tmp_path, keys):
    import sqlite3

    import sqlalchemy

    db = tmp_path / "old.sqlite"
    old = sqlite3.connect(db)
    old.executescript(_LEDGER_BEFORE_NULL_BLOCKS)
    old.commit()
    old.close()
    with RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=2.0)) as running:
        listing = requests.get(f"{running.url}/v1/workers", timeout=5).json()["workers"]
        assert [(w["worker_id"], w["blocks"], w["tokens_served"]) for w in listing] == [("w-old", [0, 2], 7)]
        assert len(running.store.heartbeats("w-old")) == 1
        client = CoordinatorClient(running.url, keys[0])
        worker_id = client.register(dict(registration(keys[0]), blocks=None))["worker_id"]
        assert requests.get(f"{running.url}/v1/workers/{worker_id}", timeout=5).json()["blocks"] is None
        client.heartbeat(worker_id, dict(heartbeat(state="joining"), blocks=None))
    check = sqlite3.connect(db)
    try:
        not_null = {row[1]: row[3] for row in check.execute("PRAGMA table_info(workers)")}
        assert not_null["block_start"] == 0 and not_null["block_end"] == 0 and not_null["peer_id"] == 1
        assert check.execute("PRAGMA foreign_key_check").fetchall() == []
        assert check.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1
        tables = [r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "workers_unknown_blocks" not in tables
    finally:
        check.close()
    # opened again: nothing left to rebuild, everything still there, and foreign keys enforced
    with RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=2.0)) as running:
        assert len(requests.get(f"{running.url}/v1/workers", timeout=5).json()["workers"]) == 2
        with pytest.raises(sqlalchemy.exc.IntegrityError, match="FOREIGN KEY"):  # the store's errors: SQLAlchemy's
            running.store.add_usage("w-none", [usage_record()], time.time(), lambda s, e: 1.0, 1.0, 0.001)


def test_a_worker_for_a_model_the_mesh_does_not_serve_is_refused(tmp_path, keys):
    """Its usage would otherwise be paid with share 1.0 of a model nobody routes to."""
    settings = Settings(db_path=tmp_path / "c.sqlite", model_blocks={"farworker-tiny-llama": 4})
    with RunningCoordinator(settings) as running:
        r = signed_post(running.url, keys[1], "/v1/workers/register",
                        registration(keys[1], model_name="meta-llama/Llama-2-70b-chat-hf"))
        assert r.status_code == 400, r.text
        assert r.json()["field"] == "model_name" and "farworker-tiny-llama" in r.json()["error"]
        assert running.store.counts()["workers"] == 0
        ok = signed_post(running.url, keys[1], "/v1/workers/register", registration(keys[1]))
        assert ok.status_code == 200, ok.text


def test_a_signed_worker_is_paid_for_attested_work_only(coordinator, keys):
    """A dishonest worker, correctly signed: registered for block 0:1, routed 10 tokens there by the
    coordinator, it claims 10^9 tokens on blocks 0:4. Before attestation it was credited 1e6 $FAR for it."""
    client = CoordinatorClient(coordinator.url, keys[2])
    worker_id = client.register(registration(keys[2], blocks=(0, 1), total_blocks=4))["worker_id"]
    client.heartbeat(worker_id, heartbeat(blocks=(0, 1)))
    attest(coordinator, keys[2].peer_id, (0, 1), 10)
    client.send_usage(worker_id, [usage_record(10**9, blocks=(0, 4))])

    view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()
    honest = ledger.earned_far(10, share=1 / 4, reliability=1.0, far_per_token=ledger.DEFAULT_FAR_PER_TOKEN)
    assert view["claimed_far"] == pytest.approx(ledger.earned_far(10**9, 1.0, 1.0, ledger.DEFAULT_FAR_PER_TOKEN))
    assert view["earnings_far"] == pytest.approx(honest)  # 10 tokens on one block of four, not 10^9 on four
    assert view["unattested_tokens"] == 10**9 - 10
    assert view["reliability"] < 1e-6 < view["uptime_pct"]  # an over-claim costs reliability, not uptime
    rate = client.heartbeat(worker_id, heartbeat(blocks=(0, 1)))["earn_rate_far_per_hour"]
    assert 0 < rate <= honest * 3600 / coordinator.settings.heartbeat_interval_s  # the shortest window: one interval
