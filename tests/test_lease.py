"""The background-loops lease (services/lease.py) on a real SQLite ledger shared by two stores, as two replicas
share it: one holder at a time, taken over once expired, handed over at once on release. Times are given, not
waited for."""

from __future__ import annotations

from farworker.coordinator.services.lease import Lease, ttl_for
from farworker.coordinator.store import Store


def two_replicas(tmp_path, ttl=30.0):
    stores = Store(tmp_path / "c.sqlite"), Store(tmp_path / "c.sqlite")  # two connections, as two processes
    return stores, Lease(stores[0], "loops", "a", ttl), Lease(stores[1], "loops", "b", ttl)


def test_one_replica_holds_the_lease_until_it_expires(tmp_path):
    stores, a, b = two_replicas(tmp_path)
    assert a.hold(1000.0)
    assert not b.hold(1000.1)  # a holds it
    assert a.hold(1010.0)  # renewed: now until 1040
    assert not b.hold(1035.0)  # the renewal counted: 1030 has passed, 1040 has not
    assert stores[1].lease("loops") == {"holder": "a", "expires_at": 1040.0}
    assert b.hold(1040.1)  # a stopped renewing (dead): b takes it
    assert not a.hold(1041.0)  # and a, back, does not take it from b
    assert not a.held(1041.0) and b.held(1041.0)
    for store in stores:
        store.close()


def test_a_released_lease_is_taken_at_once(tmp_path):
    stores, a, b = two_replicas(tmp_path)
    assert a.hold(1000.0)
    a.release()
    assert b.hold(1000.1)
    for store in stores:
        store.close()


def test_a_holder_whose_database_is_away_keeps_the_lease_only_until_its_expiry(tmp_path):
    stores, a, _ = two_replicas(tmp_path)
    assert a.hold(1000.0)
    stores[0].close()  # every write now fails
    assert a.hold(1020.0)  # still its own until 1030: nobody else can have taken it
    assert not a.hold(1031.0)  # past it: another replica may hold it, so this one stops
    stores[1].close()


def test_a_dead_holder_is_replaced_within_two_heartbeat_intervals():
    interval = 30.0
    lease = Lease(None, "loops", "a", ttl_for(interval))
    # the holder dies right after a renewal: its lease ends one TTL later, and another replica tries every
    # retry_every_s, so it has it by TTL + retry_every_s at the latest
    assert lease.ttl_s + lease.retry_every_s < 2 * interval
