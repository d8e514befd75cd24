"""Floods are shed, not served (issue 22): a real coordinator on loopback against a flooding party with fresh keys.

- the registration rate per source: the excess answers 429 with Retry-After, other sources are not affected;
- the allowlist: a registrant that is not on it is refused, and nothing is stored;
- the bound on unproven workers: beyond it new workers answer 503, known ones still register again, and a place
  comes free when an unproven worker ages out;
- the pages of GET /v1/workers and GET /v1/hosts: stable order, cursors that walk everything once, 400 naming
  the field for a bad limit or cursor;
- the probe order (services/probe_order.py): serving workers first, unreachable ones backed off, never
  quarantined for not answering.

The slow test runs 2,000 registrations beside an honest `farworker run` worker, which is still probed and paid.
"""

from __future__ import annotations

import time

import pytest
import requests
from coordinator_fixtures import registration, signed_post
from flood_client import FLOOD_SOURCE, beat_all, fresh_identities, register_all
from polling import wait_for

from farworker.coordinator.app import Settings
from farworker.coordinator.service import RunningCoordinator
from farworker.coordinator.services import probe_order


def coordinator_with(tmp_path, **settings) -> RunningCoordinator:
    return RunningCoordinator(Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0,
                                       **settings))


def statuses(answers) -> list[int]:
    return [a.status_code for a in answers]


def test_registrations_over_the_rate_of_a_source_answer_429_and_other_sources_are_served(tmp_path):
    with coordinator_with(tmp_path, registration_rate="5/minute") as coordinator:
        answers = register_all(coordinator.url, fresh_identities(12), threads=4)
        assert sorted(statuses(answers)) == [200] * 5 + [429] * 7, [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        body = refused.json()
        assert body["code"] == "rate_limited" and "\n" not in body["error"]
        assert f"too many registrations from {FLOOD_SOURCE}: at most 5/minute" == body["error"]
        assert coordinator.store.counts()["workers"] == 5  # nothing stored for the refused ones
        # the honest source (127.0.0.1) has its own window
        assert statuses(register_all(coordinator.url, fresh_identities(2), source="127.0.0.1")) == [200, 200]


def test_a_registrant_off_the_allowlist_is_refused_and_nothing_is_stored(tmp_path):
    wallet_listed, by_key, stranger = fresh_identities(3)
    listed_wallet = "0x" + "11" * 20
    allowlist = {listed_wallet, by_key.peer_id}
    with coordinator_with(tmp_path, registration_allowlist=allowlist) as coordinator:
        ok_wallet = signed_post(coordinator.url, wallet_listed, "/v1/workers/register",
                                {**registration(wallet_listed), "wallet_address": listed_wallet})
        ok_key = signed_post(coordinator.url, by_key, "/v1/workers/register", registration(by_key))
        assert (ok_wallet.status_code, ok_key.status_code) == (200, 200), (ok_wallet.text, ok_key.text)
        before = coordinator.store.counts()
        refused = signed_post(coordinator.url, stranger, "/v1/workers/register", registration(stranger))
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "not_allowed" and refused.json()["field"] == "wallet_address"
        assert coordinator.store.counts() == before
        assert coordinator.store.worker_by_peer(stranger.peer_id) is None


def test_new_workers_beyond_the_unproven_bound_answer_503_until_one_ages_out(tmp_path):
    ttl = 3.0
    first, second, third, late = fresh_identities(4)
    with coordinator_with(tmp_path, max_unproven_workers=2, unproven_ttl_s=ttl) as coordinator:
        assert statuses(register_all(coordinator.url, [first, second])) == [200, 200]
        (refused,) = register_all(coordinator.url, [third])
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "too_many_unproven" and 1 <= int(refused.headers["Retry-After"]) <= ttl + 1
        assert coordinator.store.worker_by_peer(third.peer_id) is None
        # a worker already held registers again (a restart, its span learnt): never refused by the bound
        assert statuses(register_all(coordinator.url, [first])) == [200]
        # the first two never prove themselves: once their TTL has passed they hold no place
        time.sleep(ttl + 0.5)
        assert statuses(register_all(coordinator.url, [third])) == [200]
        (still_full,) = register_all(coordinator.url, [late])  # the third holds one of the 2 places, and...
        assert still_full.status_code == 200  # ...the other is free: the first two aged out
        assert statuses(register_all(coordinator.url, fresh_identities(1))) == [503]


def walk(url: str, path: str, key: str, limit: int) -> tuple[list[dict], int]:
    """Every item of a paged list, following next_cursor (bounded), and the pages it took."""
    items, cursor, pages = [], None, 0
    for pages in range(1, 100):  # noqa: B007 - the count is returned
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        answer = requests.get(url + path, params=params, timeout=10)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert len(page[key]) <= limit
        items += page[key]
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
    raise AssertionError("the cursor walk did not end")


def test_worker_and_host_lists_page_in_a_stable_order_and_refuse_bad_limits_and_cursors(tmp_path):
    identities = fresh_identities(7)
    with coordinator_with(tmp_path, registration_rate=None) as coordinator:
        order = []
        for i, identity in enumerate(identities):  # one at a time: the registration order is known
            answer = signed_post(coordinator.url, identity, "/v1/workers/register",
                                 {**registration(identity), "host_id": f"host-{i % 3}" if i < 6 else None})
            order.append(answer.json()["worker_id"])
        workers, pages = walk(coordinator.url, "/v1/workers", "workers", 3)
        assert [w["worker_id"] for w in workers] == order and pages == 3
        # the default page holds a private mesh's every worker: clients that never page see them all
        assert [w["worker_id"] for w in requests.get(f"{coordinator.url}/v1/workers", timeout=10).json()["workers"]
                ] == order

        # a worker registering in the middle of a walk comes at its end, and nothing is seen twice
        first = requests.get(f"{coordinator.url}/v1/workers", params={"limit": 2}, timeout=10).json()
        (late,) = fresh_identities(1)
        late_id = signed_post(coordinator.url, late, "/v1/workers/register", registration(late)).json()["worker_id"]
        rest, cursor = [], first["next_cursor"]
        while cursor:
            page = requests.get(f"{coordinator.url}/v1/workers", params={"limit": 2, "cursor": cursor},
                                timeout=10).json()
            rest, cursor = rest + page["workers"], page["next_cursor"]
        assert [w["worker_id"] for w in first["workers"] + rest] == [*order, late_id]

        hosts, _ = walk(coordinator.url, "/v1/hosts", "hosts", 2)
        assert [h["host_id"] for h in hosts] == ["host-0", "host-1", "host-2", None]
        assert sorted(w for h in hosts for w in h["worker_ids"]) == sorted([*order, late_id])

        for params, field in (({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "many"}, "limit"),
                              ({"cursor": "not-a-cursor!"}, "cursor"), ({"cursor": "WzEsMl0"}, "cursor"),
                              ({"cursor": "x" * 600}, "cursor")):
            for path in ("/v1/workers", "/v1/hosts"):
                answer = requests.get(coordinator.url + path, params=params, timeout=10)
                assert answer.status_code == 400, (path, params, answer.text)
                assert answer.json()["field"] == field and "\n" not in answer.json()["error"], answer.text


def rows(*specs):
    """Worker rows (worker id, registration time) for the probe order."""
    return [{"worker_id": w, "registered_at": at} for w, at in specs]


def test_the_probe_order_puts_serving_workers_first_and_backs_off_unreachable_ones():
    period, now = 10.0, 1000.0
    workers = rows(("flood-new", 5.0), ("honest-new", 1.0), ("proven", 3.0), ("failing", 0.5), ("unreachable", 0.1))
    stats = {
        "proven": {"last_at": now - period, "unanswered": 0},
        "failing": {"last_at": now - period, "unanswered": 2},
        "unreachable": {"last_at": now - period, "unanswered": probe_order.UNREACHABLE_AFTER},
        "flood-new": None,
    }
    stats = {k: v for k, v in stats.items() if v}
    ordered = [r["worker_id"] for r in probe_order.order(workers, {"proven"}, stats, now, period)]
    # the unreachable one probed a period ago waits for its back-off (2 periods); new ones by registration time
    assert ordered == ["proven", "honest-new", "flood-new", "failing"]
    later = now + 2 * period
    stats["unreachable"]["last_at"] = now - period
    assert [r["worker_id"] for r in probe_order.order(workers, {"proven"}, stats, later, period)][-1] == "unreachable"
    # back-off doubles up to a bound: still probed, rarely; and the view says why
    assert [probe_order.backoff_periods(n) for n in range(0, 10)] == [1, 1, 1, 2, 4, 8, 16, 16, 16, 16]
    assert probe_order.view({"last_at": 0, "unanswered": 3}) == {"unanswered_probes": 3, "probe_unreachable": True}
    assert probe_order.view(None) == {"unanswered_probes": 0, "probe_unreachable": False}
    assert probe_order.problem(2) is None
    assert probe_order.problem(4) == ("not reachable from the coordinator: its last 4 probes got no answer; probed "
                                      "every 4 probe periods until one is answered")
    # a round probes every serving worker, then at least one more (no new worker starves), then while time is left
    serving, new = {"probe_tier": 0}, {"probe_tier": 1}
    assert probe_order.round_goes_on(serving, 5, -1.0) and probe_order.round_goes_on(new, 0, -1.0)
    assert not probe_order.round_goes_on(new, 1, -1.0) and probe_order.round_goes_on(new, 1, 0.5)


def test_flood_heartbeats_cost_no_registration_room(tmp_path):
    """Accepted flood workers beat 'online' (pretending to serve); without a mesh nothing proves them, so they
    keep holding the unproven places and new registrants are refused, while a known worker's beats are served."""
    with coordinator_with(tmp_path, max_unproven_workers=3, registration_rate=None) as coordinator:
        flood = fresh_identities(5)
        answers = register_all(coordinator.url, flood, threads=1)
        assert statuses(answers) == [200, 200, 200, 503, 503]
        accepted = [(i, a.json()["worker_id"]) for i, a in zip(flood, answers, strict=True) if a.status_code == 200]
        beat_all(coordinator.url, accepted)
        wait_for(lambda: all(w["state"] == "online" for w in requests.get(
            f"{coordinator.url}/v1/workers", timeout=10).json()["workers"]), 10, "the flood's beats counted")
        assert coordinator.store.unproven_workers(0.0)[0] == 3


FLOOD = 2000
FLOOD_RATE = 20  # per hour from one source: the flood's share (per minute, a flood that ran past a minute on a
# loaded machine saw its first accepted hits leave the moving window and more get through)
PERIOD = 2.0  # probe period


def probes_of(store, worker_id: str, since: float) -> list[dict]:
    return [p for p in reversed(store.probes(worker_id, 100_000)) if p["at"] >= since]  # oldest first


@pytest.mark.slow
def test_a_flood_of_registrations_is_shed_and_an_honest_worker_is_still_probed_and_paid(
        tmp_path, tiny_model, bootstrap_peer, start_workers):
    import threading

    from farworker.tiny_model import TINY_MODEL_NAME

    identities = fresh_identities(FLOOD)  # the flooder's own cost, before the clock of anything below
    settings = Settings(db_path=tmp_path / "coordinator.sqlite3", heartbeat_interval_s=1.0, model_path=tiny_model,
                        model_name=TINY_MODEL_NAME, initial_peers=tuple(bootstrap_peer), probe_period_s=PERIOD,
                        registration_rate=f"{FLOOD_RATE}/hour", max_unproven_workers=64)
    with RunningCoordinator(settings) as coordinator:
        honest = start_workers("honest", "0:4", bootstrap_peer, api_url=coordinator.url)
        honest_id = coordinator.store.worker_by_peer(honest.wait_online()["peer_id"])
        wait_for(lambda: coordinator.store.probe_summary(honest_id)["probes_passed"] >= 1, 60, "a first probe")

        flood_began = time.time()
        answers = register_all(coordinator.url, identities, model_name=TINY_MODEL_NAME)
        codes = statuses(answers)
        assert (codes.count(200), codes.count(429)) == (FLOOD_RATE, FLOOD - FLOOD_RATE), set(codes)
        accepted = [(i, a.json()["worker_id"]) for i, a in zip(identities, answers, strict=True)
                    if a.status_code == 200]
        flood_ids = [w for _, w in accepted]

        # the accepted ones pretend to serve the whole model: they beat 'online' while the honest one is probed
        stop = threading.Event()

        def beat():
            while not stop.is_set():
                beat_all(coordinator.url, accepted)
                stop.wait(0.5)

        beater = threading.Thread(target=beat, name="flood-beats", daemon=True)
        beater.start()
        try:
            def flood_marked():
                stats = coordinator.store.probe_stats()
                return all(probe_order.unreachable(stats.get(w, {"unanswered": 0})["unanswered"]) for w in flood_ids)

            wait_for(flood_marked, 300, "every flood worker marked unreachable by its unanswered probes")
            flood_probed_at = time.time()
            honest_before = len(probes_of(coordinator.store, honest_id, flood_probed_at))
            wait_for(lambda: len(probes_of(coordinator.store, honest_id, flood_probed_at)) >= honest_before + 5, 60,
                     "5 more probes of the honest worker")
        finally:
            stop.set()
            beater.join(10)

        honest_probes = probes_of(coordinator.store, honest_id, flood_began)
        gaps = [b["at"] - a["at"] for a, b in zip(honest_probes, honest_probes[1:], strict=False)]
        print(f"honest probes during the flood: {len(honest_probes)}, gaps {[round(g, 2) for g in gaps]}")
        # answered (a probe timing out on a loaded machine is no fault of the worker's, so a few may), never wrong
        unanswered = [p for p in honest_probes if p["problem"] is not None]
        assert len(unanswered) <= len(honest_probes) // 10, honest_probes
        # probed at every round: a round starts each period, the honest worker first in it (measured 1.8-2.6 s;
        # starved behind the flood, without the probe order, 12.2 s)
        assert gaps and max(gaps) <= 3 * PERIOD, gaps
        stats = coordinator.store.probe_stats()
        flood_probes = [stats[w]["unanswered"] for w in flood_ids]
        assert max(flood_probes) < len(honest_probes), (flood_probes, len(honest_probes))  # backed off
        views = {w["worker_id"]: w for w in walk(coordinator.url, "/v1/workers", "workers", 1000)[0]}
        for worker_id in flood_ids:  # not answering is not a wrong answer: never quarantined
            assert views[worker_id]["quarantined"] is None and views[worker_id]["probe_unreachable"], views[worker_id]
        assert views[honest_id]["probe_unreachable"] is False and views[honest_id]["quarantined"] is None

        answer = requests.post(f"{coordinator.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4},
                               timeout=120)
        assert answer.status_code == 200, answer.text
        wait_for(lambda: walk(coordinator.url, "/v1/workers", "workers", 1000)[0][0]["earnings_far"] > 0, 60,
                 "the honest worker paid for the completion it served")


def test_the_coordinator_flags_refuse_a_bad_rate_and_an_empty_allowlist_in_one_line(tmp_path):
    from click.testing import CliRunner

    from farworker.config import EX_CONFIG
    from farworker.coordinator.command import coordinator_command, read_allowlist

    db = str(tmp_path / "c.sqlite3")
    bad_rate = CliRunner().invoke(coordinator_command, ["--db", db, "--registration-rate", "lots"])
    assert bad_rate.exit_code == EX_CONFIG
    assert bad_rate.output.strip().splitlines() == [
        "--registration-rate: registration rate 'lots': expected COUNT/PERIOD, e.g. 30/minute or 5/second"]
    empty = tmp_path / "allowlist"
    empty.write_text("# nobody yet\n\n")
    refused = CliRunner().invoke(coordinator_command, ["--db", db, "--registration-allowlist", str(empty)])
    assert refused.exit_code == EX_CONFIG and "no entries in the file" in refused.output
    listed = tmp_path / "listed"
    listed.write_text("0xabc  # the operator's wallet\nQmPeer\n")
    assert read_allowlist(listed) == {"0xabc", "QmPeer"}
    listed.write_text("0xabc QmPeer\n")
    with pytest.raises(ValueError, match="line 1: expected one wallet address, peer id or public key"):
        read_allowlist(listed)


def test_the_store_counts_only_the_last_unanswered_probes_in_a_row(tmp_path):
    from coordinator_fixtures import registration as registration_of

    from farworker.coordinator.store import Store

    store = Store(tmp_path / "ledger.sqlite3")
    ids = [store.register(registration_of(i), 1.0, 30.0) for i in fresh_identities(3)]
    silent, wrong, back = ids
    unanswered = {"tokens": 0, "error": None, "problem": "no answer from the worker"}
    for at, (worker_id, probe) in enumerate([
        (silent, {"tokens": 8, "error": 0.0, "problem": None}), (silent, unanswered), (silent, unanswered),
        (silent, unanswered),
        (wrong, unanswered), (wrong, {"tokens": 8, "error": 0.5, "problem": "differs"}),  # a wrong answer answers
        (back, unanswered), (back, unanswered), (back, {"tokens": 8, "error": 0.0, "problem": None}),
    ]):
        store.record_probe(worker_id, float(at), 0, probe["tokens"], probe["error"], 1e-3, probe["problem"], False)
    stats = store.probe_stats()
    assert {w: stats[w]["unanswered"] for w in ids} == {silent: 3, wrong: 0, back: 0}
    assert stats[silent]["last_at"] == 3.0 and store.probe_stats(silent) == {silent: stats[silent]}
    assert store.proven_worker_ids() == {silent, back}  # passed a probe once: proven, even if silent since
    assert store.unproven_workers(0.0) == (1, 1.0)
    store.close()
