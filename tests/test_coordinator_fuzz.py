"""Fuzzing the coordinator's endpoints over real HTTP: whatever a worker or client sends, the answer is never a
5xx (a bad payload gets a 4xx naming the field), and a refused request stores nothing.

Payloads are signed correctly by a registered worker, so they get past the signature check and reach the
validation and the ledger. Each payload starts from a valid one with one field replaced by arbitrary JSON
(numbers at the edges: huge, negative, float for int, NaN and infinities as Python's json writes them).
"""

from __future__ import annotations

import json

import pytest
import requests
from coordinator_fixtures import heartbeat, registration, signed_post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.identity import Identity
from farworker.outbox import make_record

EDGE_NUMBERS = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, -1, 0, 1.5, float("inf"), float("-inf"),
                                float("nan"), 1e308, -0.0])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | EDGE_NUMBERS | st.text(max_size=300)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20),
                                                                                         inner, max_size=5),
                    max_leaves=20)
VALUE = EDGE_NUMBERS | JSON  # half of the draws at the numeric edges, where overflows and NaN live
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "coordinator.sqlite"
    # no registration rate or unproven bound: hundreds of registrations must reach the payload checks, not a 429
    with RunningCoordinator(Settings(db_path=path, heartbeat_interval_s=2.0, model_blocks={"farworker-tiny-llama": 4},
                                     registration_rate=None, max_unproven_workers=1_000_000)) as running:
        yield running


@pytest.fixture(scope="module")
def worker(coordinator):
    identity = Identity.generate()
    worker_id = CoordinatorClient(coordinator.url, identity).register(registration(identity))["worker_id"]
    return identity, worker_id


def mutate(payload: dict, path: list, value):
    """payload with the field at ``path`` (keys and list indices) replaced by ``value``."""
    copy = json.loads(json.dumps(payload))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def leaf_paths(value, prefix=()):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from leaf_paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield (*prefix, index)
            yield from leaf_paths(inner, (*prefix, index))


def send(coordinator, identity, path, payload) -> requests.Response:
    before = coordinator.store.counts()
    body = json.dumps(payload).encode()  # NaN and Infinity as Python writes them: not strict JSON
    r = signed_post(coordinator.url, identity, path, body)
    assert r.status_code < 500, (payload, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.json()["error"], r.text
        assert coordinator.store.counts() == before, payload
    return r


USAGE = {"records": [make_record("s", (0, 2), 5, 1, 1_800_000_000.0, 1_800_000_001.0)]}
REGISTER_FIELDS = list(leaf_paths(registration(Identity.generate())))
HEARTBEAT_FIELDS = list(leaf_paths(heartbeat()))
USAGE_FIELDS = list(leaf_paths(USAGE))


@FUZZ
@given(field=st.sampled_from(HEARTBEAT_FIELDS), value=VALUE)
def test_heartbeat_fields(coordinator, worker, field, value):
    identity, worker_id = worker
    send(coordinator, identity, f"/v1/workers/{worker_id}/heartbeat", mutate(heartbeat(), list(field), value))


@FUZZ
@given(field=st.sampled_from(USAGE_FIELDS), value=VALUE)
def test_usage_fields(coordinator, worker, field, value):
    identity, worker_id = worker
    payload = mutate(USAGE, list(field), value)
    if "records" in payload and isinstance(payload["records"], list) and payload["records"] and isinstance(
            payload["records"][0], dict) and field[-1] != "id":
        payload["records"][0]["id"] = make_record("s", (0, 1), 1, 1, 1.0)["id"]  # a fresh id: not a repeat
    send(coordinator, identity, f"/v1/workers/{worker_id}/usage", payload)


@FUZZ
@given(field=st.sampled_from([f for f in REGISTER_FIELDS if f[0] not in ("peer_id", "public_key")]), value=VALUE)
def test_registration_fields(coordinator, field, value):
    identity = Identity.generate()
    send(coordinator, identity, "/v1/workers/register", mutate(registration(identity), list(field), value))


@FUZZ
@given(payload=JSON)
def test_whole_bodies(coordinator, worker, payload):
    identity, worker_id = worker
    for tail in ("heartbeat", "usage", "deregister"):
        send(coordinator, identity, f"/v1/workers/{worker_id}/{tail}", payload)
    r = requests.post(coordinator.url + "/v1/completions", data=json.dumps(payload), timeout=10,
                      headers={"Content-Type": "application/json"})
    # this coordinator has no model: a well-formed request gets 503 no_model, never another 5xx
    assert r.status_code < 500 or r.json()["error"]["code"] == "no_model", (payload, r.text[:300])
