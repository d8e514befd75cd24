"""Settle later, forfeit on fraud (docs/trust.md, "Settlement"): paid $FAR is pending for --settle-after seconds,
then settled; a quarantine forfeits what is still pending and freezes what pays.

The rule called directly on a real SQLite store at chosen times (every figure worked out by hand in the comments),
then a real coordinator over HTTP with real signed workers: the three amounts survive a restart on the same file,
the heartbeat answer and `farworker status` show them, and a quarantined worker cannot win its pending pay back."""

from __future__ import annotations

import time
import uuid

import pytest
import requests
from coordinator_fixtures import heartbeat, registration
from test_ledger_rules import INTERVAL, MODEL, PEER, T0, figures_at, receipt, record, route, workers_of
from test_ledger_rules import registration as stored_registration

from farworker.api_client import CoordinatorClient
from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.services import ledger
from farworker.coordinator.store import Store
from farworker.identity import Identity
from farworker.outbox import make_record
from farworker.receipts import ClientKey
from farworker.status_view import format_status

WINDOW = 100.0  # --settle-after of the rule tests, seconds
AMOUNTS = ("settled_far", "pending_far", "forfeited_far")


@pytest.fixture
def store(ledger_db):
    s = Store(ledger_db)
    yield s
    s.close()


def amounts(f: dict) -> tuple[float, float, float]:
    return tuple(f[key] for key in AMOUNTS)


def quarantine(store: Store, worker_id: str, at: float) -> None:
    """A wrong answer to a spot check at ``at``: what spot_check.record_verdict stores."""
    store.record_probe(worker_id, at, 0, 8, 0.5, 1e-3, "block 0 activations differ", quarantine=True)


# --- the rule ------------------------------------------------------------------------------------------------
def test_pending_turns_settled_after_the_window(store):
    workers = workers_of(store, settle_after_s=WINDOW)
    worker_id = store.register(stored_registration(), T0, INTERVAL)
    # 100 tokens on 0:4 at T0 + 10 (reliability 1): 0.1 $FAR, all of it attested
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1)], T0 + 10)
    route(store, (0, 4), 100)
    assert amounts(figures_at(workers, worker_id, T0 + 10)) == pytest.approx((0.0, 0.1, 0.0))
    assert amounts(figures_at(workers, worker_id, T0 + 109.9)) == pytest.approx((0.0, 0.1, 0.0))
    assert amounts(figures_at(workers, worker_id, T0 + 110)) == pytest.approx((0.1, 0.0, 0.0))  # 100 s old
    # a second claim at T0 + 95 (slot 3; up in slot 1, not in slot 2: uptime 1 / 2 = 0.5: 0.05 $FAR), attested
    store.heartbeat(worker_id, {"state": "online", "blocks": [0, 4]}, T0 + 35)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=2)], T0 + 95)
    route(store, (0, 4), 100, n=1)
    f = figures_at(workers, worker_id, T0 + 120)
    assert amounts(f) == pytest.approx((0.1, 0.05, 0.0)) and f["earnings_far"] == pytest.approx(0.15)
    assert amounts(figures_at(workers, worker_id, T0 + 195)) == pytest.approx((0.15, 0.0, 0.0))


def test_a_quarantine_forfeits_what_is_pending_and_keeps_what_settled(store):
    workers = workers_of(store, settle_after_s=WINDOW)
    worker_id = store.register(stored_registration(), T0, INTERVAL)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1)], T0 + 10)  # 0.1 $FAR, settles at T0 + 110
    store.heartbeat(worker_id, {"state": "online", "blocks": [0, 4]}, T0 + 35)  # slot 1 up
    # at T0 + 125 (slot 4: up in 1 of slots 1..3): 100 tokens on 0:4 x 1/3 = 0.0333 $FAR, settles at T0 + 225
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=2)], T0 + 125)
    route(store, (0, 4), 200)  # all 800 token-blocks attested
    assert amounts(figures_at(workers, worker_id, T0 + 199)) == pytest.approx((0.1, 0.1 / 3, 0.0))
    quarantine(store, worker_id, T0 + 200)  # caught before the second claim settled
    f = figures_at(workers, worker_id, T0 + 200)
    assert amounts(f) == pytest.approx((0.1, 0.0, 0.1 / 3))
    assert f["earnings_far"] == pytest.approx(0.1 + 0.1 / 3)  # paid, as before settlement: all three
    # what was forfeited never settles, however long one waits
    assert amounts(figures_at(workers, worker_id, T0 + 100 * WINDOW)) == pytest.approx((0.1, 0.0, 0.1 / 3))


def test_a_worker_that_cheated_from_the_start_settles_nothing(store):
    workers = workers_of(store, settle_after_s=WINDOW)
    worker_id = store.register(stored_registration(), T0, INTERVAL)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1), record(60, blocks=(0, 4), n=2)], T0 + 10)
    route(store, (0, 4), 160)
    quarantine(store, worker_id, T0 + 20)  # its first check, before anything settled
    for now in (T0 + 20, T0 + 10 + WINDOW, T0 + 100 * WINDOW):
        f = figures_at(workers, worker_id, now)
        assert amounts(f) == pytest.approx((0.0, 0.0, 0.16)), now  # 160 tokens x 1 x 0.001: all forfeited


@pytest.mark.parametrize("quarantined_at", [None, T0 + 160])
def test_settled_pending_and_forfeited_add_up_to_what_was_paid_before_settlement(store, quarantined_at):
    """Two price tiers, half covered, the rest paid at an unvouched rate of 0.5: the three amounts add up to the
    paid formula (ledger.paid_far over all payable claims, what earnings_far was before settlement) at every time,
    and each claim counts its own tier's paid share where its acceptance time puts it."""
    workers = workers_of(store, settle_after_s=WINDOW, pay_unvouched_rate=0.5)
    worker_id = store.register(stored_registration(), T0, INTERVAL)
    # claim 1 at T0 + 10, reliability 1: 0.1 $FAR for 400 token-blocks (0.00025 per token-block)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1)], T0 + 10)
    # claim 2 at T0 + 155 (slot 5), up in 1 of slots 1..4: uptime 1 / 4: 0.025 $FAR for 400 token-blocks (the
    # cheap tier)
    store.heartbeat(worker_id, {"state": "online", "blocks": [0, 4]}, T0 + 35)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=2)], T0 + 155)
    route(store, (0, 4), 100)  # 400 of 800 token-blocks attested: claim 2 in full, claim 1 at the rate, 0.05
    if quarantined_at is not None:
        quarantine(store, worker_id, quarantined_at)
    expected = {  # (settled, pending, forfeited) by time
        T0 + 20: (0.0, 0.075, 0.0),
        T0 + 110: (0.05, 0.025, 0.0),  # claim 1 settled
        T0 + 260: (0.075, 0.0, 0.0),  # both
    } if quarantined_at is None else {
        T0 + 200: (0.05, 0.0, 0.025),  # at T0 + 160 claim 1 had settled, claim 2 had not
    }
    for now, figures in expected.items():
        f = figures_at(workers, worker_id, now)
        totals = workers.totals(worker_id, now, now)
        before = ledger.paid_far([tier[:2] for tier in totals["payable_by_price"]], totals["claimed_token_blocks"],
                                 400, 0.5)
        assert amounts(f) == pytest.approx(figures), now
        assert sum(amounts(f)) == pytest.approx(f["earnings_far"]) and f["earnings_far"] == pytest.approx(before)


def test_settle_after_zero_is_the_rule_before_settlement(store):
    """No window: everything paid is settled at once, and a quarantine forfeits nothing."""
    workers = workers_of(store, settle_after_s=0)
    worker_id = store.register(stored_registration(), T0, INTERVAL)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1)], T0 + 10)
    route(store, (0, 4), 100)
    assert amounts(figures_at(workers, worker_id, T0 + 10)) == pytest.approx((0.1, 0.0, 0.0))
    quarantine(store, worker_id, T0 + 11)
    assert amounts(figures_at(workers, worker_id, T0 + 11)) == pytest.approx((0.1, 0.0, 0.0))


def test_a_quarantine_freezes_what_pays(store):
    """After its quarantine nothing moves a worker's settled or forfeited pay: not a receipt a colluding client
    files for it (it would have raised its covered share), not a route, not new claims (they would have lowered
    it)."""
    workers = workers_of(store, settle_after_s=WINDOW)
    worker_id = store.register(stored_registration(), T0, INTERVAL)
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1)], T0 + 10)  # 0.1 $FAR, 400 token-blocks
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=2)], T0 + 10)
    route(store, (0, 4), 100)  # half of the 800 token-blocks: 0.05 + 0.05 paid
    quarantine(store, worker_id, T0 + 150)
    assert amounts(figures_at(workers, worker_id, T0 + 150)) == pytest.approx((0.1, 0.0, 0.0))
    workers.add_usage(worker_id, [record(300, blocks=(0, 4), n=3)], T0 + 160)  # after: claimed, never paid
    frozen = amounts(figures_at(workers, worker_id, T0 + 160))
    assert frozen == pytest.approx((0.1, 0.0, 0.0))
    assert store.add_receipts([receipt((0, 4), 100)], T0 + 170)[0]  # vouches for the other 400 token-blocks
    store.record_completion("cmpl-late", T0 + 170, MODEL, 1, 1,
                            [{"peer_id": PEER, "worker_id": None, "blocks": [0, 4], "tokens": 400}])
    assert amounts(figures_at(workers, worker_id, T0 + 10 * WINDOW)) == pytest.approx(frozen)


def test_the_settle_after_setting_is_checked():
    with pytest.raises(ValueError, match="settle_after_s"):
        Settings(db_path="unused.sqlite", settle_after_s=-1)


# --- a real coordinator over HTTP ----------------------------------------------------------------------------
SETTLE_S = 6.0  # long enough for a restart on a loaded machine to fit inside it


def coordinator_settings(db, client_key: ClientKey | None = None) -> Settings:
    keys = {client_key.key_id: ("colluder", client_key.public_key_b64)} if client_key else {}
    # a long heartbeat interval: every claim comes in the registration's own interval, at reliability 1
    return Settings(db_path=db, heartbeat_interval_s=60.0, settle_after_s=SETTLE_S, model_blocks={MODEL: 4},
                    client_keys=keys)


def claim(client: CoordinatorClient, worker_id: str, coordinator: RunningCoordinator, peer_id: str,
          tokens: int) -> dict:
    """A usage record the worker sends and the coordinator attests (its own completion routed those tokens)."""
    record = make_record("sess", (0, 2), tokens=tokens, steps=2, started_at=time.time() - 1)
    assert client.send_usage(worker_id, [record]) == [record["id"]]
    coordinator.store.record_completion(f"cmpl-{record['id']}", time.time(), MODEL, 1, 1, [
        {"peer_id": peer_id, "worker_id": worker_id, "blocks": [0, 2], "tokens": tokens}])
    return record


def view(url: str, worker_id: str) -> dict:
    return requests.get(f"{url}/v1/workers/{worker_id}", timeout=10).json()


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()))


def test_settled_pending_and_forfeited_survive_a_coordinator_restart(tmp_path):
    honest, cheater = Identity.generate(), Identity.generate()
    db = tmp_path / "coordinator.sqlite"
    with RunningCoordinator(coordinator_settings(db)) as coordinator:
        clients = {who: CoordinatorClient(coordinator.url, who) for who in (honest, cheater)}
        ids = {who: clients[who].register(registration(who))["worker_id"] for who in (honest, cheater)}
        for who in (honest, cheater):
            claim(clients[who], ids[who], coordinator, who.peer_id, 100)
        sleep_until(time.time() + SETTLE_S + 0.2)  # the first claims settled
        second = time.time()
        for who in (honest, cheater):
            claim(clients[who], ids[who], coordinator, who.peer_id, 40)
        settles = time.time() + SETTLE_S + 0.2
        quarantine(coordinator.store, ids[cheater], time.time())
        before = {who: view(coordinator.url, ids[who]) for who in (honest, cheater)}
        answer = clients[honest].heartbeat(ids[honest], heartbeat())
    assert time.time() < second + SETTLE_S - 1, "too slow to see pending before it settles: raise SETTLE_S"
    good, bad = before[honest], before[cheater]
    assert good["settled_far"] > 0 and good["pending_far"] > 0 and good["forfeited_far"] == 0
    assert bad["settled_far"] == pytest.approx(good["settled_far"]) and bad["pending_far"] == 0
    assert bad["forfeited_far"] == pytest.approx(good["pending_far"])  # the same claims, forfeited
    for f in (good, bad):
        assert sum(amounts(f)) == pytest.approx(f["earnings_far"])
    assert amounts(answer) == pytest.approx(amounts(good))  # the heartbeat answer says the same

    with RunningCoordinator(coordinator_settings(db)) as coordinator:  # the same file, a new process state
        after = {who: view(coordinator.url, ids[who]) for who in (honest, cheater)}
        assert time.time() < second + SETTLE_S, "too slow to see pending before it settles: raise SETTLE_S"
        assert amounts(after[honest]) == pytest.approx(amounts(good))
        assert amounts(after[cheater]) == pytest.approx(amounts(bad))
        (host,) = requests.get(f"{coordinator.url}/v1/hosts", timeout=10).json()["hosts"]  # both: no host id
        assert amounts(host) == pytest.approx([g + b for g, b in zip(amounts(good), amounts(bad), strict=True)])
        sleep_until(settles)  # the honest worker's pending settles; the forfeited does not
        assert amounts(view(coordinator.url, ids[honest])) == pytest.approx(
            (good["settled_far"] + good["pending_far"], 0.0, 0.0))
        assert amounts(view(coordinator.url, ids[cheater])) == pytest.approx(amounts(bad))


def test_farworker_status_shows_the_heartbeat_answers_settlement(tmp_path):
    worker = Identity.generate()
    with RunningCoordinator(coordinator_settings(tmp_path / "c.sqlite")) as coordinator:
        client = CoordinatorClient(coordinator.url, worker)
        worker_id = client.register(registration(worker))["worker_id"]
        claim(client, worker_id, coordinator, worker.peer_id, 30)  # 30 x 2/4 x 0.001 = 0.015, pending
        answer = client.heartbeat(worker_id, heartbeat())
    # what the reporter keeps in the status file (reporting.Reporter.last_heartbeat)
    status = {"state": "online", "healthy": True, "updated_at": time.time(),
              "last_heartbeat": {"at": time.time(), "payload": heartbeat(), "answer": answer}}
    assert "earnings       0 settled, 0.015 pending, 0 forfeited $FAR" in format_status(status)


def test_a_quarantined_worker_cannot_win_its_pending_pay_back(tmp_path):
    """After its quarantine the worker keeps beating, registers again with its key, sends its old usage records
    again and new ones, and a client colluding with it files signed receipts for its peer: what was forfeited
    stays forfeited, nothing is pending, and settled does not grow, also once the window has passed."""
    cheater, colluder = Identity.generate(), ClientKey.generate()
    with RunningCoordinator(coordinator_settings(tmp_path / "c.sqlite", colluder)) as coordinator:
        client = CoordinatorClient(coordinator.url, cheater)
        worker_id = client.register(registration(cheater))["worker_id"]
        old = [claim(client, worker_id, coordinator, cheater.peer_id, 100)]
        sleep_until(time.time() + SETTLE_S + 0.2)  # settled
        old.append(claim(client, worker_id, coordinator, cheater.peer_id, 100))
        # and a claim nobody attested: 2/3 of its claimed token-blocks are covered, receipts could cover the rest
        old.append(make_record("sess", (0, 2), tokens=100, steps=2, started_at=time.time() - 1))
        assert client.send_usage(worker_id, old[-1:]) == [old[-1]["id"]]
        quarantine(coordinator.store, worker_id, time.time())
        caught = view(coordinator.url, worker_id)
        assert caught["settled_far"] > 0 and caught["forfeited_far"] > 0 and caught["pending_far"] == 0

        assert client.register(registration(cheater))["worker_id"] == worker_id  # the same key: the same ledger
        for _ in range(3):
            assert client.heartbeat(worker_id, heartbeat())["quarantined"]
        assert sorted(client.send_usage(worker_id, old)) == sorted(r["id"] for r in old)  # counted once already
        new = make_record("sess-2", (0, 2), tokens=500, steps=2, started_at=time.time() - 1)
        assert client.send_usage(worker_id, [new]) == [new["id"]]
        vouching = [colluder.sign({"id": str(uuid.uuid4()), "peer_id": cheater.peer_id,
                                   "blocks": [0, 2], "tokens": 600, "session_id": f"direct-{i}", "model": MODEL,
                                   "created_at": int(time.time())}) for i in range(2)]
        filed = requests.post(f"{coordinator.url}/v1/receipts", json={"receipts": vouching}, timeout=10)
        assert filed.status_code == 200 and len(filed.json()["accepted"]) == 2
        sleep_until(time.time() + SETTLE_S + 0.5)  # everything it sent is past the window now
        later = view(coordinator.url, worker_id)
        answer = client.heartbeat(worker_id, heartbeat())
    assert later["tokens_served"] == caught["tokens_served"] + 500  # claimed, never paid
    assert amounts(later) == pytest.approx(amounts(caught))
    assert amounts(answer) == pytest.approx(amounts(caught))
