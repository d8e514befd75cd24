"""Runtime: the coordinator's background work (mesh client, routed checks, spot-check loop, DHT watch), started
together and stopped once, each stop bounded."""

from __future__ import annotations

import threading

from farworker.coordinator.dht_watch import LOOKUP_TIMEOUT_S, DhtWatch
from farworker.coordinator.mesh import CompletionsMesh
from farworker.coordinator.spot_check import RoutedChecks, SpotChecker, SpotCheckLoop
from farworker.mesh_client import CLOSE_TIMEOUT

CHECK_STOP_S = 10.0  # RoutedChecks.stop and SpotCheckLoop.stop: the check in progress
DHT_WATCH_STOP_S = LOOKUP_TIMEOUT_S + 5.0  # one DHT read
STOP_BOUND_S = 2 * CHECK_STOP_S + DHT_WATCH_STOP_S + CLOSE_TIMEOUT + 5.0  # the whole stop, at worst


class Runtime:
    """What runs beside the HTTP routes. Built from the settings (nothing runs yet): the mesh client only with a
    model, the routed checks with a sample share, the probe loop with a probe period, the DHT watch with a mesh
    view. ``start()`` starts the threads; ``stop()`` ends everything, once, whoever calls it again."""

    def __init__(self, settings, store, workers, registry):
        self.settings, self.store, self.workers, self.registry = settings, store, workers, registry
        self.mesh = None
        if settings.has_mesh:
            self.mesh = CompletionsMesh(settings.model_path, list(settings.initial_peers), settings.dht_prefix)
        self.routed_checks = None
        self.spot_checks = None
        self.dht_watch = None
        self._stopped = False
        self._lock = threading.Lock()

    def start(self) -> Runtime:
        if self.mesh is None:
            return self
        settings = self.settings
        if settings.sample_routed > 0:
            self.routed_checks = RoutedChecks(SpotChecker(self.mesh), self.store, settings.sample_routed,
                                              registry=self.registry).start()
            self.workers.routed_checks = self.routed_checks
        if settings.probe_period_s > 0:
            self.spot_checks = SpotCheckLoop(SpotChecker(self.mesh), self.store, settings.probe_period_s,
                                             self.workers.to_probe).start()
        if settings.watches_dht:
            self.dht_watch = DhtWatch(self.mesh, self.store, settings.heartbeat_interval_s, settings.dht_prefix,
                                      lambda: settings.model_blocks.get(settings.model_name),
                                      self.workers.to_watch).start()
        return self

    def stop(self) -> None:
        """Bounded: the verification in progress (RoutedChecks.stop), a probe (SpotCheckLoop.stop), one DHT read
        (DhtWatch.stop), the client's DHT and p2pd (mesh_client.CLOSE_TIMEOUT). A second call does nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for part, bound in ((self.routed_checks, CHECK_STOP_S), (self.spot_checks, CHECK_STOP_S),
                            (self.dht_watch, DHT_WATCH_STOP_S)):
            if part is not None:
                part.stop(timeout=bound)
        if self.mesh is not None:
            self.mesh.close()
