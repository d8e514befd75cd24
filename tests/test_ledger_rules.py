"""The ledger's rules called directly, without HTTP or processes: claimed, attested and paid, over-claims,
quarantine, uptime slots (with and without a DHT view), live state, and which models a worker may register for.
A real SQLite store where a rule reads one; every expected figure is worked out by hand in the comments."""

from __future__ import annotations

import pytest

from farworker.coordinator.errors import ApiError
from farworker.coordinator.services import ledger, uptime
from farworker.coordinator.services.workers import Workers
from farworker.coordinator.settings import Settings
from farworker.coordinator.store import Store

T0 = 1_800_000_000.0
INTERVAL = 30.0
PEER = "12D3KooWPeerOfTheWorkerUnderTest1111111111111"
MODEL = "farworker-tiny-llama"


def registration(peer_id: str = PEER, blocks=(0, 2)) -> dict:
    """What Store.register keeps of a validated registration (the store checks nothing itself)."""
    return {"peer_id": peer_id, "public_key": "k" * 64, "wallet_address": "0x" + "ab" * 20, "model_name": MODEL,
            "blocks": list(blocks), "total_blocks": 4, "torch_dtype": "float32", "quant_type": "none",
            "location": "Test Lab", "version": "0.1.0", "announce_maddrs": [], "hardware": {}}


def record(tokens: int, blocks=(0, 2), n: int = 0) -> dict:
    return {"id": f"00000000-0000-4000-8000-{n:012d}", "session_id": f"s{n}", "blocks": list(blocks),
            "tokens": tokens, "steps": 1, "started_at": T0, "ended_at": T0}


def route(store: Store, blocks, tokens: int, n: int = 0) -> None:
    """A completion the coordinator routed through the worker (attested)."""
    store.record_completion(f"cmpl-{n}", T0, MODEL, 1, 1,
                            [{"peer_id": PEER, "worker_id": None, "blocks": list(blocks), "tokens": tokens}])


def receipt(blocks, tokens: int, n: int = 0) -> dict:
    """A direct client's receipt, as the receipts route stores it once verified (vouched)."""
    return {"id": f"10000000-0000-4000-8000-{n:012d}", "session_id": f"direct-{n}", "peer_id": PEER,
            "blocks": list(blocks), "tokens": tokens, "model": MODEL, "client_key_id": "0" * 32, "created_at": 0}


@pytest.fixture
def store(ledger_db):
    s = Store(ledger_db)
    yield s
    s.close()


def workers_of(store: Store, **settings) -> Workers:
    return Workers(store, Settings(db_path=store.path, heartbeat_interval_s=INTERVAL,
                                   model_blocks={MODEL: 4}, **settings))


def figures_at(workers: Workers, worker_id: str, now: float) -> dict:
    return workers.figures(workers.store.worker_row(worker_id), now)


# --- claimed, attested, paid ---------------------------------------------------------------------------------
def test_paid_is_the_attested_share_of_the_claims_and_a_probe_attests_one_block(store):
    workers = workers_of(store)
    worker_id = store.register(registration(), T0, INTERVAL)
    # 100 tokens on blocks 0:2 of 4, just registered (reliability 1): 100 x 2/4 x 1 x 0.001 = 0.05 $FAR claimed,
    # 100 x 2 = 200 token-blocks
    assert workers.add_usage(worker_id, [record(100)], T0) == [record(100)["id"]]
    f = figures_at(workers, worker_id, T0)
    assert f["tokens_served"] == 100 and f["tokens_attested"] == 0
    assert f["claimed_far"] == pytest.approx(0.05) and f["earnings_far"] == 0.0  # a claim alone pays nothing
    # routed 40 tokens on 0:2 (80 token-blocks) and probed once with 10 tokens (one block: 10 token-blocks):
    # covered 90 of 200 -> paid 0.45 x 0.05 = 0.0225
    route(store, (0, 2), 40)
    store.record_probe(worker_id, T0, 1, 10, 1e-6, 1e-3, None, quarantine=False)
    f = figures_at(workers, worker_id, T0)
    assert f["tokens_attested"] == 50 and f["unattested_tokens"] == 50
    assert f["earnings_far"] == pytest.approx(0.0225)
    # 100 claimed - 50 attested = 50, within the slack of 64 tokens: no over-claim, reliability stays 1
    assert f["reliability"] == 1.0 and f["uptime_pct"] == 100.0
    # the hour's rate: the window is one interval (30 s) just after registration; 0.05 x 0.45 paid x 3600 / 30
    assert f["earn_rate_far_per_hour"] == pytest.approx(2.7)


def test_an_over_claim_is_cut_to_what_was_attested_and_vouched_and_scales_reliability(store):
    workers = workers_of(store)
    worker_id = store.register(registration(blocks=(0, 1)), T0, INTERVAL)
    # claims 1000 tokens on the whole model 0:4: 1000 x 1 x 1 x 0.001 = 1.0 $FAR, 4000 token-blocks
    workers.add_usage(worker_id, [record(1000, blocks=(0, 4))], T0)
    route(store, (0, 1), 10)  # routed only 10 tokens on 0:1: 10 token-blocks
    f = figures_at(workers, worker_id, T0)
    # covered 10 / 4000 = 0.0025 -> paid 0.0025; 1000 - 10 = 990 > 64: an over-claim, reliability x 0.0025
    assert f["earnings_far"] == pytest.approx(0.0025)
    assert f["reliability"] == pytest.approx(0.0025)
    assert f["unvouched_tokens"] == 990
    # a direct client vouches for 100 tokens on 0:4 (400 token-blocks): covered (10 + 400) / 4000 = 0.1025
    assert store.add_receipts([receipt((0, 4), 100)], T0) == ([receipt((0, 4), 100)["id"]], [])
    f = figures_at(workers, worker_id, T0)
    assert f["tokens_vouched"] == 100 and f["unvouched_tokens"] == 890
    assert f["earnings_far"] == pytest.approx(0.1025) and f["reliability"] == pytest.approx(0.1025)
    # an operator who pays half of what nobody vouched for: 0.1025 + 0.5 x (1.0 - 0.1025) = 0.55125
    generous = workers_of(store, pay_unvouched_rate=0.5)
    assert figures_at(generous, worker_id, T0)["earnings_far"] == pytest.approx(0.55125)


def test_nothing_received_after_a_quarantine_pays(store):
    workers = workers_of(store)
    worker_id = store.register(registration(), T0, INTERVAL)
    # 100 tokens on 0:4 at T0 + 10 (reliability 1): 0.1 $FAR claimed, 400 token-blocks
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=1)], T0 + 10)
    store.record_probe(worker_id, T0 + 20, 0, 8, 0.5, 1e-3, "block 0 activations differ", quarantine=True)
    # another 100 tokens on 0:4 after the quarantine (uptime still 1 in slot 0): claimed, never payable
    workers.add_usage(worker_id, [record(100, blocks=(0, 4), n=2)], T0 + 25)
    route(store, (0, 4), 200)  # every claimed token-block attested (800 of 800)
    f = figures_at(workers, worker_id, T0 + 25)
    assert f["claimed_far"] == pytest.approx(0.2)
    assert f["earnings_far"] == pytest.approx(0.1)  # the first record only
    assert f["reliability"] == 0.0 and f["quarantined"] == "block 0 activations differ"
    assert workers.live_state(store.worker_row(worker_id), T0 + 25) == "quarantined"


def test_paid_far_values_covered_claims_cheapest_first():
    # two claims of 100 token-blocks each, worth 0.1 and 0.3 $FAR; 100 of 200 covered: the cheap one, 0.1
    claims = [(100, 0.1), (100, 0.3)]
    assert ledger.paid_far(claims, 200, 100) == pytest.approx(0.1)
    assert ledger.paid_far(claims, 200, 150) == pytest.approx(0.1 + 0.15)
    assert ledger.paid_far(claims, 200, 1000) == pytest.approx(0.4)  # never more than claimed
    assert ledger.paid_far(claims, 200, 100, unvouched_rate=1.0) == pytest.approx(0.4)


# --- uptime --------------------------------------------------------------------------------------------------
def beat(store: Store, worker_id: str, at: float, healthy: bool = True) -> None:
    store.heartbeat(worker_id, {"state": "online", "blocks": [0, 2], "healthy": healthy}, at)


def beating_worker(store: Store) -> str:
    """Beats in slots 0 (the registration's: no count), 1, 1 again, 2, 3 (unhealthy) and 4."""
    worker_id = store.register(registration(), T0, INTERVAL)
    for at, healthy in ((5, True), (35, True), (40, True), (65, True), (95, False), (125, True)):
        beat(store, worker_id, T0 + at, healthy)
    return worker_id


def test_uptime_counts_one_healthy_beat_per_slot(store):
    worker_id = beating_worker(store)
    row = store.worker_row(worker_id)
    assert row["heartbeat_count"] == 3  # slots 1, 2 and 4
    # at T0 + 130 (slot 4, up already): judged over slots 1..4, first up 1; up 1, 2 and 4 -> 3 / 4
    assert uptime.up_intervals(store, row, with_dht=False) == 3
    assert uptime.observe(store, row, with_dht=False, now=T0 + 130) == uptime.ObservedUptime(up=3, basis=4, new=True)
    assert figures_at(workers_of(store), worker_id, T0 + 130)["uptime_pct"] == pytest.approx(75.0)
    # at T0 + 170 (slot 5, no beat yet: not counted until it ends), then T0 + 185 (slot 5 over, missed)
    assert uptime.observe(store, row, with_dht=False, now=T0 + 170).fraction == pytest.approx(3 / 4)
    later = uptime.observe(store, row, with_dht=False, now=T0 + 185)
    assert (later.basis, later.new, later.fraction) == (5, False, pytest.approx(3 / 5))


def test_with_a_dht_view_a_slot_needs_the_beat_and_the_span_online(store):
    worker_id = beating_worker(store)
    # the DHT showed the span ONLINE in slots 1, 3 and 4; slot 2 had a beat but no ONLINE span, slot 3 no
    # counted beat: up are slots 1 and 4 -> (2 + 1) / 5 = 0.6
    assert ledger.online_slot(T0, T0 + 10, INTERVAL) is None  # the registration's slot is never recorded
    store.record_online({worker_id: ledger.online_slot(T0, T0 + 31, INTERVAL)})  # slot 1
    store.record_online({worker_id: 3})
    store.record_online({worker_id: 4})
    row = store.worker_row(worker_id)
    assert uptime.up_intervals(store, row, with_dht=True) == 2
    assert uptime.up_intervals(store, row, with_dht=False) == 3


def test_no_slot_counts_from_a_quarantine_on(store):
    worker_id = beating_worker(store)
    store.record_online({worker_id: 1})
    store.record_online({worker_id: 2})
    store.record_online({worker_id: 4})
    store.record_probe(worker_id, T0 + 70, 0, 8, 0.5, 1e-3, "wrong", quarantine=True)  # slot 2
    row = store.worker_row(worker_id)
    assert uptime.up_intervals(store, row, with_dht=False) == 1  # slot 1 only (2 and 4 are after)
    assert uptime.up_intervals(store, row, with_dht=True) == 1


def test_the_dht_shows_a_worker_serving_only_when_its_whole_span_is_online():
    rows = [{"worker_id": "a", "peer_id": "pa", "block_start": 0, "block_end": 2},
            {"worker_id": "b", "peer_id": "pb", "block_start": 2, "block_end": 4},
            {"worker_id": "c", "peer_id": "pc", "block_start": None, "block_end": None},
            {"worker_id": "d", "peer_id": "pd", "block_start": 3, "block_end": 5}]
    states = [{"pa": "ONLINE"}, {"pa": "ONLINE"}, {"pb": "ONLINE"}, {"pb": "JOINING", "pd": "ONLINE"}]
    assert uptime.online_workers(rows, states) == ["a"]


# --- live state ----------------------------------------------------------------------------------------------
def test_offline_after_three_missed_intervals_and_the_slack(store):
    workers = workers_of(store)
    worker_id = store.register(registration(), T0, INTERVAL)
    # never beaten: the registration is the last sign of life; 3 x 30 + 10 = 100 s later it is offline
    assert workers.live_state(store.worker_row(worker_id), T0 + 100) == "joining"
    assert workers.live_state(store.worker_row(worker_id), T0 + 100.5) == "offline"
    beat(store, worker_id, T0 + 125)
    assert workers.live_state(store.worker_row(worker_id), T0 + 225) == "online"
    assert workers.live_state(store.worker_row(worker_id), T0 + 225.5) == "offline"


# --- registration -----------------------------------------------------------------------------------------
def test_a_coordinator_named_for_a_model_refuses_workers_of_another(store):
    """--model-name without --model-path still names what this mesh serves (issue 18)."""
    named = Workers(store, Settings(db_path=store.path, model_name=MODEL))
    with pytest.raises(ApiError) as refused:
        named.check_model("meta-llama/Llama-2-70b-chat-hf")
    assert refused.value.status == 400 and refused.value.field == "model_name"
    named.check_model(MODEL)
    named.check_model(f"/srv/models/{MODEL}")  # a local checkpoint directory of it: the same DHT prefix
    Workers(store, Settings(db_path=store.path)).check_model("meta-llama/Llama-2-70b-chat-hf")  # names none: any


def test_uptime_counts_from_the_first_up_slot_so_loading_is_not_downtime(store):
    """Loading for slots 1-3 (beats, no span ONLINE), then up in every slot 4..10: 100 %, not new. Before, the
    loading slots and the slot in progress counted as down: 8 / 12 at the same moment."""
    worker_id = store.register(registration(), T0, INTERVAL)
    for slot in range(1, 11):
        beat(store, worker_id, T0 + slot * INTERVAL + 1)
        if slot >= 4:
            store.record_online({worker_id: slot})
    row = store.worker_row(worker_id)
    seen = uptime.observe(store, row, with_dht=True, now=T0 + 11 * INTERVAL + 5)  # slot 11 just begun
    assert (seen.up, seen.basis, seen.new, seen.fraction) == (7, 7, False, 1.0)
    # a restart later (registered again, same worker) does not move the start: its loading counts as down
    store.register(registration(), T0 + 11 * INTERVAL + 6, INTERVAL)
    later = uptime.observe(store, store.worker_row(worker_id), with_dht=True, now=T0 + 14 * INTERVAL + 5)
    assert (later.up, later.basis) == (7, 10)


def test_a_worker_up_every_other_slot_reads_half(store):
    worker_id = store.register(registration(), T0, INTERVAL)
    for slot in range(1, 21, 2):  # up in odd slots only
        beat(store, worker_id, T0 + slot * INTERVAL + 1)
        store.record_online({worker_id: slot})
    seen = uptime.observe(store, store.worker_row(worker_id), with_dht=True, now=T0 + 21 * INTERVAL + 5)
    assert (seen.up, seen.basis, seen.new) == (10, 20, False)
    assert figures_at(workers_of(store), worker_id, T0 + 21 * INTERVAL + 5)["uptime_pct"] == pytest.approx(50.0)


def test_a_worker_never_seen_up_is_new_and_earns_nothing(store):
    worker_id = store.register(registration(), T0, INTERVAL)
    for slot in range(1, 9):  # beats, never ONLINE in the DHT
        beat(store, worker_id, T0 + slot * INTERVAL + 1)
    seen = uptime.observe(store, store.worker_row(worker_id), with_dht=True, now=T0 + 9 * INTERVAL + 5)
    assert (seen.up, seen.new, seen.fraction) == (0, True, 0.0)
