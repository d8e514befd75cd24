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
    """What runs beside the HTTP routes, built from the settings: the mesh client only with a model, the routed
    checks with a sample share, the probe loop with a probe period, the DHT watch with a mesh view (each None
    otherwise). ``start()`` starts their threads; ``stop()`` ends everything, once, whoever calls it again."""

    def __init__(self, settings, store, workers, registry):
        self.settings = settings
        self.mesh = self.routed_checks = self.spot_checks = self.dht_watch = None
        if settings.has_mesh:
            self.mesh = CompletionsMesh(settings.model_path, list(settings.initial_peers), settings.dht_prefix)
            if settings.sample_routed > 0:
                self.routed_checks = RoutedChecks(SpotChecker(self.mesh), store, settings.sample_routed,
                                                  registry=registry)
            if settings.probe_period_s > 0:
                self.spot_checks = SpotCheckLoop(SpotChecker(self.mesh), store, settings.probe_period_s,
                                                 workers.to_probe)
            if settings.watches_dht:
                self.dht_watch = DhtWatch(self.mesh, store, settings.heartbeat_interval_s, settings.dht_prefix,
                                          lambda: settings.model_blocks.get(settings.model_name), workers.to_watch)
        workers.routed_checks = self.routed_checks  # the worker view shows their counts
        self._started = self._stopped = False
        self._lock = threading.Lock()

    def _threads(self) -> list:
        return [part for part in (self.routed_checks, self.spot_checks, self.dht_watch) if part is not None]

    def start(self) -> Runtime:
        with self._lock:
            if not self._started and not self._stopped:
                self._started = True
                for part in self._threads():
                    part.start()
        return self

    def stop(self) -> None:
        """Bounded: the verification in progress (RoutedChecks.stop), a probe (SpotCheckLoop.stop), one DHT read
        (DhtWatch.stop), the client's DHT and p2pd (mesh_client.CLOSE_TIMEOUT). A second call does nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._started:
            for part, bound in ((self.routed_checks, CHECK_STOP_S), (self.spot_checks, CHECK_STOP_S),
                                (self.dht_watch, DHT_WATCH_STOP_S)):
                if part is not None:
                    part.stop(timeout=bound)
        if self.mesh is not None:
            self.mesh.close()
