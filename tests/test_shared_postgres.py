"""Two real coordinators (RunningCoordinator: the app over loopback HTTP) sharing one real Postgres, as two replicas
behind a load balancer would: a signed request replayed to the other replica is refused (the nonces live in the
database), and a usage batch posted to both at once is counted once (its record ids are unique keys)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from coordinator_fixtures import heartbeat, registration, signed_post

from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.settings import Settings
from farworker.identity import Identity
from farworker.outbox import make_record


def test_two_coordinators_on_one_postgres_refuse_a_replay_and_count_a_batch_once(postgres_server):
    db = postgres_server.new_database()
    me = Identity.generate()
    with RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=2.0)) as a, \
            RunningCoordinator(Settings(db_path=db, heartbeat_interval_s=2.0)) as b:
        registered = signed_post(a.url, me, "/v1/workers/register", registration(me))
        assert registered.status_code == 200, registered.text
        worker_id = registered.json()["worker_id"]

        path = f"/v1/workers/{worker_id}/heartbeat"
        body = json.dumps(heartbeat()).encode()
        headers = {"Content-Type": "application/json", **me.sign("POST", path, body)}
        assert requests.post(a.url + path, data=body, headers=headers, timeout=10).status_code == 200
        replayed = requests.post(b.url + path, data=body, headers=headers, timeout=10)  # the same bytes, replica b
        assert replayed.status_code == 401 and replayed.json()["error"] == "nonce already used (replayed request)"
        assert len(b.store.heartbeats(worker_id)) == 1

        now = time.time()
        records = [make_record(f"s{i}", (0, 2), tokens=10 + i, steps=2, started_at=now - 5) for i in range(5)]
        usage = f"/v1/workers/{worker_id}/usage"
        with ThreadPoolExecutor(2) as pool:  # each signed on its own (its own nonce), sent to both at once
            answers = list(pool.map(lambda c: signed_post(c.url, me, usage, {"records": records}), (a, b)))
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        ids = sorted(r["id"] for r in records)
        assert [sorted(r.json()["accepted"]) for r in answers] == [ids, ids]  # both acknowledge every record
        on_ledger = a.store.usage_records(worker_id)
        assert sorted(r["id"] for r in on_ledger) == ids and sum(r["tokens"] for r in on_ledger) == 60  # 10+..+14
        for c in (a, b):
            assert requests.get(f"{c.url}/v1/workers/{worker_id}", timeout=10).json()["tokens_served"] == 60
