"""The coordinator's runtime (its background threads) starts with the app's lifespan and stops once, bounded:
threads only, no mesh is loaded (the mesh client loads on first use)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from farworker.coordinator.runtime import STOP_BOUND_S, Runtime
from farworker.coordinator.services.workers import Workers
from farworker.coordinator.settings import Settings
from farworker.coordinator.store import Store


def test_the_runtime_starts_its_threads_and_stops_them_once(tmp_path):
    settings = Settings(db_path=tmp_path / "c.sqlite", model_path=tmp_path / "model", model_name="farworker-tiny-llama",
                        initial_peers=("/ip4/127.0.0.1/tcp/9/p2p/QmNotDialledInThisTest",), probe_period_s=60.0,
                        heartbeat_interval_s=60.0)
    store = Store(settings.db_path)
    workers = Workers(store, settings)
    runtime = Runtime(settings, store, workers, CollectorRegistry())
    parts = [runtime.routed_checks, runtime.session_audits, runtime.spot_checks, runtime.dht_watch]
    assert all(part is not None for part in parts) and workers.routed_checks is runtime.routed_checks
    runtime.start().start()  # a second start starts nothing more
    assert all(part._thread.is_alive() for part in parts)
    began = time.monotonic()
    runtime.stop()
    assert time.monotonic() - began < STOP_BOUND_S
    assert not any(part._thread.is_alive() for part in parts)
    began = time.monotonic()
    runtime.stop()  # once: the second call returns at once
    assert time.monotonic() - began < 0.1
    store.close()


def test_without_a_model_nothing_runs(tmp_path):
    settings = Settings(db_path=tmp_path / "c.sqlite")
    store = Store(settings.db_path)
    runtime = Runtime(settings, store, Workers(store, settings), CollectorRegistry())
    assert (runtime.mesh, runtime.routed_checks, runtime.spot_checks, runtime.dht_watch) == (None, None, None, None)
    runtime.start()
    runtime.stop()
    store.close()
