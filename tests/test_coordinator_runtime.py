"""The coordinator's runtime (its background threads) starts with the app's lifespan and stops once, bounded:
threads only, no mesh is loaded (the mesh client loads on first use)."""

from __future__ import annotations

import threading

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
    threads = [part._thread for part in parts]
    assert all(thread.is_alive() for thread in threads)
    stop_within_its_bound(runtime)
    assert [thread.name for thread in threads if thread.is_alive()] == []  # each part joined its thread
    stop_within_its_bound(runtime)  # once: a second call (the lifespan's, a signal's) neither fails nor waits
    runtime.start()  # stopped is final: nothing starts again
    assert [part._thread for part in parts] == threads and not any(thread.is_alive() for thread in threads)
    store.close()


def stop_within_its_bound(runtime: Runtime) -> None:
    """runtime.stop() in a thread, waited for up to STOP_BOUND_S: a deadline that fails the test, not a timing."""
    stopper = threading.Thread(target=runtime.stop, name="test-stop", daemon=True)
    stopper.start()
    stopper.join(STOP_BOUND_S)
    assert not stopper.is_alive(), f"Runtime.stop() had not returned after {STOP_BOUND_S:.0f} s"


def test_without_a_model_nothing_runs(tmp_path):
    settings = Settings(db_path=tmp_path / "c.sqlite")
    store = Store(settings.db_path)
    runtime = Runtime(settings, store, Workers(store, settings), CollectorRegistry())
    assert (runtime.mesh, runtime.routed_checks, runtime.spot_checks, runtime.dht_watch) == (None, None, None, None)
    runtime.start()
    runtime.stop()
    store.close()
