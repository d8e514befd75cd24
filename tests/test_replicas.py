"""Two real coordinator replicas (`farworker coordinator` processes on two loopback ports) sharing one ledger, as
behind a load balancer: what one saw, the other knows (nonces, usage ids, quarantines), the background loops run on
one of them and move when it dies, and a worker given both URLs reports through the death of either.

Each shared-ledger test runs twice: on one SQLite file in WAL mode (two processes on one host) and on a database of
its own on the session's real Postgres (tests/postgres_server.py), the production setup. The tests of the worker's
client alone (which URL it uses) run on the SQLite pair only: the ledger plays no part in them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from coordinator_fixtures import heartbeat, registration
from polling import wait_for

from farworker.api_client import RETURN_TO_FIRST_AFTER, CoordinatorClient, CoordinatorError
from farworker.coordinator.store import Store
from farworker.identity import Identity
from farworker.local_mesh import ManagedProcess, base_env, farworker_command
from farworker.outbox import Outbox, make_record

INTERVAL = 2.0  # the replicas' heartbeat interval: the lease's TTL, and the 2-interval takeover bound


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Replica:
    """One `farworker coordinator` process on the shared ledger ``db``; ``start()`` returns once it answers."""

    def __init__(self, work: Path, name: str, db: Path | str, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess(name, farworker_command(
            "coordinator", "--port", str(self.port), "--db", str(db), "--heartbeat-interval", str(INTERVAL),
            "--log-level", "info", *extra), base_env(), work / f"{name}.log")

    def start(self) -> Replica:
        self.proc.start()
        wait_for(self.health, 60, f"{self.proc.name} answering:\n{self.proc.log_tail()}")
        return self

    def health(self) -> dict | None:
        try:
            answer = requests.get(f"{self.url}/healthz", timeout=5)
        except requests.ConnectionError:
            if not self.proc.alive:
                raise AssertionError(f"{self.proc.name} exited:\n{self.proc.log_tail()}") from None
            return None
        return answer.json() if answer.status_code == 200 else None

    def metric(self, line_start: str) -> float | None:
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        found = re.search(rf"^{re.escape(line_start)} (\S+)$", text, re.MULTILINE)
        return float(found[1]) if found else None


# the shared-ledger tests: on both backends; the client-only tests: on the SQLite pair (one pair per backend a module)
ON_BOTH_LEDGERS = pytest.mark.parametrize("replicas", ["sqlite", "postgres"], indirect=True)
ON_SQLITE = pytest.mark.parametrize("replicas", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def replicas(request, tmp_path_factory):
    """Two replicas without a model: the worker routes, the ledger, the nonces. ``request.param``: the ledger's
    backend, a SQLite file or a database of its own on the session's Postgres (a postgresql:// URL)."""
    work = tmp_path_factory.mktemp("replicas")
    if request.param == "sqlite":
        db: Path | str = work / "ledger.sqlite"
    else:
        db = request.getfixturevalue("postgres_server").new_database()
    pair = [Replica(work, name, db) for name in ("replica-a", "replica-b")]
    try:
        yield [replica.start() for replica in pair]
    finally:
        for replica in pair:
            replica.proc.stop(timeout=30)


def register(replica: Replica, identity: Identity) -> str:
    return CoordinatorClient(replica.url, identity).register(registration(identity))["worker_id"]


def signed(identity: Identity, path: str, payload: dict) -> tuple[bytes, dict]:
    body = json.dumps(payload).encode()
    return body, {"Content-Type": "application/json", **identity.sign("POST", path, body)}


@ON_BOTH_LEDGERS
def test_a_heartbeat_replayed_to_the_other_replica_is_refused(replicas):
    first, second = replicas
    worker = Identity.generate()
    worker_id = register(first, worker)
    path = f"/v1/workers/{worker_id}/heartbeat"
    body, headers = signed(worker, path, heartbeat())
    assert requests.post(first.url + path, data=body, headers=headers, timeout=10).status_code == 200
    replayed = requests.post(second.url + path, data=body, headers=headers, timeout=10)  # within the time window
    assert replayed.status_code == 401, replayed.text
    assert "nonce" in replayed.json()["error"]
    ledger = Store(db_of(second))
    try:
        assert len(ledger.heartbeats(worker_id)) == 1  # the replay stored nothing
    finally:
        ledger.close()


@ON_BOTH_LEDGERS
def test_a_usage_batch_posted_to_both_replicas_at_once_is_counted_once(replicas):
    worker = Identity.generate()
    worker_id = register(replicas[0], worker)
    batch = [make_record(f"session-{n}", (0, 2), tokens=10 + n, steps=2, started_at=time.time() - 2)
             for n in range(20)]
    path = f"/v1/workers/{worker_id}/usage"
    answers: dict[str, requests.Response] = {}
    both_ready = threading.Barrier(2)

    def post(replica: Replica) -> None:
        body, headers = signed(worker, path, {"records": batch})  # each signed on its own: a retry, not a replay
        both_ready.wait(10)
        answers[replica.url] = requests.post(replica.url + path, data=body, headers=headers, timeout=30)

    posting = [threading.Thread(target=post, args=(replica,)) for replica in replicas]
    for thread in posting:
        thread.start()
    for thread in posting:
        thread.join(40)
    expected_ids = sorted(r["id"] for r in batch)
    for answer in answers.values():  # both say the whole batch is on the ledger: the worker may forget it
        assert answer.status_code == 200 and sorted(answer.json()["accepted"]) == expected_ids
    claimed = sum(r["tokens"] for r in batch)
    for replica in replicas:
        assert requests.get(f"{replica.url}/v1/workers/{worker_id}", timeout=10).json()["tokens_served"] == claimed
    ledger = Store(db_of(replicas[0]))
    try:
        assert sorted(r["id"] for r in ledger.usage_records(worker_id)) == expected_ids
    finally:
        ledger.close()


@ON_BOTH_LEDGERS
def test_a_quarantine_decided_by_one_replica_is_seen_at_once_by_the_other(replicas):
    deciding, other = replicas
    worker = Identity.generate()
    worker_id = register(deciding, worker)
    store = Store(db_of(deciding))  # the deciding replica's write, as its probe loop makes it
    try:
        store.record_probe(worker_id, time.time(), 0, 4, 0.9, 0.01, "block 0: wrong answer", quarantine=True)
    finally:
        store.close()
    view = requests.get(f"{other.url}/v1/workers/{worker_id}", timeout=10).json()  # the very next read
    assert view["quarantined"] == "block 0: wrong answer"
    answer = CoordinatorClient(other.url, worker).heartbeat(worker_id, heartbeat())
    assert answer["quarantined"] == "block 0: wrong answer"  # the worker is told, whichever replica it reaches
    assert answer["earn_rate_far_per_hour"] == 0


def db_of(replica: Replica) -> str:
    """The replica's ledger: a SQLite path or a postgresql:// URL (Store takes either)."""
    args = replica.proc.args
    return str(args[args.index("--db") + 1])


@ON_SQLITE
def test_the_client_moves_past_a_dead_replica_and_tries_the_first_again_later(replicas, caplog):
    worker = Identity.generate()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    client = CoordinatorClient([dead, replicas[0].url], worker)
    caplog.set_level(logging.WARNING, logger="farworker.api_client")
    worker_id = client.register(registration(worker))["worker_id"]  # answered by the second
    assert client.base_url == replicas[0].url and len(caplog.records) == 1
    for _ in range(RETURN_TO_FIRST_AFTER - 1):
        client.heartbeat(worker_id, heartbeat())
    assert len(caplog.records) == 1  # stayed on the one that answers
    client.heartbeat(worker_id, heartbeat())  # the 20th success elsewhere: the next call tries the first
    client.heartbeat(worker_id, heartbeat())
    assert len(caplog.records) == 2 and client.base_url == replicas[0].url  # tried it, moved on again


def route_of(replica: Replica) -> set[str]:
    answer = requests.post(f"{replica.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=120)
    assert answer.status_code == 200, answer.text
    return {span["peer_id"] for span in answer.json()["route"]}


@ON_SQLITE
def test_a_refusal_is_an_answer_and_does_not_move_the_client(replicas, caplog):
    """A 4xx is about the request, whichever replica answers it: the client does not try it elsewhere."""
    stranger = Identity.generate()  # never registered: 401 on any replica
    client = CoordinatorClient([replica.url for replica in replicas], stranger)
    caplog.set_level(logging.WARNING, logger="farworker.api_client")
    with pytest.raises(CoordinatorError) as refused:
        client.heartbeat("no-such-worker", heartbeat())
    assert refused.value.status == 401
    assert client.base_url == replicas[0].url and caplog.records == []


@ON_SQLITE
def test_check_names_the_replica_that_answers(replicas, tmp_path):
    from farworker.config import load_config
    from farworker.preflight import check_api_and_clock

    dead = f"http://127.0.0.1:{free_port()}"
    config = load_config({"FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20, "FARLABS_NEW_SWARM": "true",
                          "FARLABS_API_BASE_URL": f"{dead},{replicas[1].url}", "FARLABS_STATE_DIR": str(tmp_path)})
    api = check_api_and_clock(config)[0]
    assert api.level == "OK" and replicas[1].url in api.detail and f"{dead} unreachable" in api.detail


@pytest.mark.slow
@pytest.mark.faults
def test_a_replica_without_the_lease_routes_nothing_to_a_worker_another_quarantined(tmp_path, tiny_model,
                                                                                      bootstrap_peer, start_workers):
    """The probe loop that excludes quarantined workers from routing runs on the lease holder only: the other
    replicas' mesh clients must learn the quarantine too (Runtime._follow_quarantines)."""
    db = tmp_path / "ledger.sqlite"
    model = ("--model-path", str(tiny_model), "--initial-peer", bootstrap_peer[0], "--probe-period", "3600")
    holder = Replica(tmp_path, "replica-a", db, *model).start()
    other = Replica(tmp_path, "replica-b", db, *model).start()
    try:
        assert other.health()["held"] is False
        workers = [start_workers(name, "0:4", bootstrap_peer, api_url=holder.url) for name in ("w1", "w2")]
        peers = [worker.wait_online()["peer_id"] for worker in workers]
        used = route_of(other)  # loads its mesh client; petals picks one of the two
        assert len(used) == 1 and used <= set(peers), used
        cheat = used.pop()
        spare = ({*peers} - {cheat}).pop()
        worker_id = wait_for(lambda: (v := worker_by_peer(holder, cheat)) and v["worker_id"], 60, "registered")
        ledger = Store(db)  # the holder's probe loop would write this on a wrong answer
        try:
            ledger.record_probe(worker_id, time.time(), 0, 4, 0.9, 0.01, "block 0: wrong answer", quarantine=True)
        finally:
            ledger.close()
        # the other replica's mesh client drops it within a lease tick and petals' next route update
        routes: list[set[str]] = []
        wait_for(lambda: routes.append(route_of(other)) or routes[-3:] == [{spare}] * 3, 2 * INTERVAL + 60,
                 "three completions in a row through the other replica avoiding the quarantined worker")
        # and from then on, none: a streak could be petals' choice by chance
        after = [route_of(other) for _ in range(8)]
        assert all(route == {spare} for route in after), (after, cheat)
    finally:
        for replica in (holder, other):
            replica.proc.stop(timeout=60)


# The kills run on Postgres, the store replicas share in production (roles/farworker_coordinator); two replicas on one
# SQLite file take the lease the same way (the same SQL: tests/test_lease.py, tests/test_store_backends.py).
ON_POSTGRES = pytest.mark.parametrize("ledger_db", ["postgres"], indirect=True)


@pytest.mark.faults
@ON_POSTGRES
def test_killing_the_lease_holder_moves_the_probe_loop_to_the_other_replica(tmp_path, tiny_model, bootstrap_peer,
                                                                           ledger_db):
    db = ledger_db  # a SQLite file, or a database of its own on the session's Postgres
    # probes and the DHT watch need a model and a mesh (a bare bootstrap peer: no worker to probe)
    model = ("--model-path", str(tiny_model), "--initial-peer", bootstrap_peer[0], "--probe-period", "60")
    first = Replica(tmp_path, "replica-a", db, *model).start()
    second = Replica(tmp_path, "replica-b", db, *model)
    try:
        assert first.health()["held"] is True  # free at its start: it took it
        second.start()
        assert second.health()["held"] is False and second.health()["lease"]["holder"] == first.health()["holder"]
        running = 'farworker_coordinator_background_loop_running{loop="spot_checks"}'
        watching = 'farworker_coordinator_background_loop_running{loop="dht_watch"}'
        assert (first.metric(running), second.metric(running)) == (1.0, 0.0)
        assert (first.metric(watching), second.metric(watching)) == (1.0, 0.0)
        assert second.metric("farworker_coordinator_lease_held") == 0.0
        first.proc.kill()  # SIGKILL: no release, the lease must expire
        # within 2 heartbeat intervals by the rule (services/lease.py); the slack is for a loaded 2-core machine
        wait_for(lambda: second.health()["held"], 2 * INTERVAL + 20, "the other replica taking the lease")
        assert second.metric(running) == 1.0 and second.metric("farworker_coordinator_lease_held") == 1.0
        assert second.metric(watching) == 1.0
        # a clean stop hands the lease over at once (released): the first, restarted, gets it back that way
        restarted = Replica(tmp_path, "replica-a2", db, *model).start()
        assert restarted.health()["held"] is False
        second.proc.stop(timeout=60)
        wait_for(lambda: restarted.health()["held"], 2 * INTERVAL + 20, "the restarted replica taking the lease")
        restarted.proc.stop(timeout=60)
    finally:
        for replica in (first, second):
            replica.proc.kill()


@pytest.mark.slow
@pytest.mark.faults
@ON_POSTGRES
def test_a_worker_given_both_replicas_reports_through_the_death_of_either(tmp_path, tiny_model, start_workers,
                                                                          ledger_db):
    from farworker.mesh_client import MeshClient

    db = ledger_db  # a SQLite file, or a database of its own on the session's Postgres
    first = Replica(tmp_path, "replica-a", db).start()
    second = Replica(tmp_path, "replica-b", db).start()
    try:
        worker = start_workers("failover", "0:4", api_url=f"{first.url},{second.url}")
        status = worker.wait_online()
        outbox = Outbox(worker.state_dir / "outbox.sqlite3")
        client = MeshClient(tiny_model, [a for a in status["maddrs"] if "/127.0.0.1/" in a], "farworker-tiny-llama")
        try:
            def serve_and_report(reachable: Replica, what: str) -> None:
                beats = beat_count(reachable, worker_id)
                client.generate([1, 17, 230, 45], max_tokens=4, temperature=0.0)
                wait_for(lambda: outbox.depth() == 0 and outbox.pending() == [], 60, f"usage reported {what}")
                wait_for(lambda: beat_count(reachable, worker_id) > beats + 1, 60, f"heartbeats {what}")

            worker_id = wait_for(lambda: (v := worker_by_peer(first, status["peer_id"])) and v["worker_id"], 60,
                                 "the worker registered")
            serve_and_report(first, "to both")
            first.proc.kill()
            serve_and_report(second, "with the first replica dead")
            first = Replica(tmp_path, "replica-a2", db, port=first.port).start()  # back, same URL
            second.proc.kill()
            serve_and_report(first, "with the second replica dead")
        finally:
            client.close()
        ledger = Store(db)
        try:
            on_ledger = sum(r["tokens"] for r in ledger.usage_records(worker_id))
        finally:
            ledger.close()
        assert on_ledger > 0
        # the worker's own count of what it served (its status file is rewritten every few seconds: it may lag)
        wait_for(lambda: worker.status()["counters"]["tokens_processed"] == on_ledger, 30,
                 f"the worker's count of tokens served to equal the ledger's {on_ledger}: nothing lost, none twice")
        assert outbox.rejected() == []
        outbox.close()
    finally:
        for replica in (first, second):
            replica.proc.kill()


def beat_count(replica: Replica, worker_id: str) -> int:
    try:
        return requests.get(f"{replica.url}/v1/workers/{worker_id}", timeout=5).json()["heartbeat_count"]
    except requests.ConnectionError:
        return -1


def worker_by_peer(replica: Replica, peer_id: str) -> dict | None:
    workers = requests.get(f"{replica.url}/v1/workers", timeout=10).json()["workers"]
    return next((w for w in workers if w["peer_id"] == peer_id), None)

