"""The reference coordinator over real HTTP on loopback with a real SQLite file."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
from coordinator_fixtures import GPU_READING, heartbeat, registration, signed_post

from farworker.api_client import CoordinatorClient, CoordinatorError
from farworker.coordinator import ledger
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
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
    assert view["earnings_far"] == pytest.approx(expected)
    assert view["state"] == "online" and view["blocks"] == [0, 2] and view["heartbeat_count"] == 1
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
    assert ledger.uptime_fraction(0, 0.0, 0.0, 30) == 1.0  # just registered
    assert ledger.uptime_fraction(0, 0.0, 61.0, 30) == pytest.approx(1 / 3)
    assert ledger.uptime_fraction(2, 0.0, 61.0, 30) == 1.0
    assert ledger.uptime_fraction(50, 0.0, 61.0, 30) == 1.0


def test_fast_beats_do_not_buy_uptime(coordinator, worker):
    identity, worker_id = worker
    client = CoordinatorClient(coordinator.url, identity)
    for _ in range(5):
        client.heartbeat(worker_id, heartbeat())
    view = requests.get(f"{coordinator.url}/v1/workers/{worker_id}", timeout=5).json()
    assert view["heartbeat_count"] == 1
    assert len(coordinator.store.heartbeats(worker_id)) == 5


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
    assert r.status_code == 503 and r.json()["code"] == "no_model"
    r = requests.post(coordinator.url + "/v1/completions", json={"prompt": []}, timeout=10)
    assert r.status_code == 422 and r.json()["field"] == "prompt"
