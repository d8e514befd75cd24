"""Runtime: the coordinator's background work (mesh client, routed checks, session audits, spot-check loop, DHT
watch), started
together and stopped once, each stop bounded."""

from __future__ import annotations

import threading

from farworker.coordinator.dht_watch import LOOKUP_TIMEOUT_S, DhtWatch
from farworker.coordinator.mesh import CompletionsMesh
from farworker.coordinator.services.audit import AuditSampler, SessionAudits
from farworker.coordinator.spot_check import RoutedChecks, SpotChecker, SpotCheckLoop
from farworker.mesh_client import CLOSE_TIMEOUT

CHECK_STOP_S = 10.0  # RoutedChecks.stop, SessionAudits.stop and SpotCheckLoop.stop: the check in progress
DHT_WATCH_STOP_S = LOOKUP_TIMEOUT_S + 5.0  # one DHT read
STOP_BOUND_S = 3 * CHECK_STOP_S + DHT_WATCH_STOP_S + CLOSE_TIMEOUT + 5.0  # the whole stop, at worst


class Runtime:
    """What runs beside the HTTP routes, built from the settings: the mesh client only with a model, the routed
    checks with a sample share, the session audits with an audit share, the probe loop with a probe period, the
    DHT watch with a mesh view (each None otherwise). ``start()`` starts their threads; ``stop()`` ends everything,
    once, whoever calls it again."""

    def __init__(self, settings, store, workers, registry):
        self.settings = settings
        self.mesh = self.routed_checks = self.session_audits = self.spot_checks = self.dht_watch = None
        if settings.has_mesh:
            # No server-to-server push in the coordinator's sessions: its client names no next server, so no worker
            # learns its neighbour's session id and each computes on exactly what the coordinator sent it (a worker
            # pushing altered outputs could otherwise get an honest neighbour quarantined; docs/trust.md).
            self.mesh = CompletionsMesh(settings.model_path, list(settings.initial_peers), settings.dht_prefix,
                                        use_server_to_server=False)
            checker = SpotChecker(self.mesh)  # routed checks and audits share one reference block at a time
            if settings.sample_routed > 0:
                self.routed_checks = RoutedChecks(checker, store, settings.sample_routed, registry=registry)
            if settings.audit_share > 0:
                self.session_audits = SessionAudits(checker, store, AuditSampler(settings.audit_share),
                                                    registry=registry)
            if settings.probe_period_s > 0:
                self.spot_checks = SpotCheckLoop(SpotChecker(self.mesh), store, settings.probe_period_s,
                                                 workers.to_probe)
            if settings.watches_dht:
                self.dht_watch = DhtWatch(self.mesh, store, settings.heartbeat_interval_s, settings.dht_prefix,
                                          lambda: settings.model_blocks.get(settings.model_name), workers.to_watch)
        workers.routed_checks, workers.session_audits = self.routed_checks, self.session_audits  # their counts
        self._started = self._stopped = False
        self._lock = threading.Lock()

    def _threads(self) -> list:
        parts = (self.routed_checks, self.session_audits, self.spot_checks, self.dht_watch)
        return [part for part in parts if part is not None]

    def start(self) -> Runtime:
        with self._lock:
            if not self._started and not self._stopped:
                self._started = True
                for part in self._threads():
                    part.start()
        return self

    def stop(self) -> None:
        """Bounded: the verification in progress (RoutedChecks.stop), the audit in progress (SessionAudits.stop), a
        probe (SpotCheckLoop.stop), one DHT read (DhtWatch.stop), the client's DHT and p2pd
        (mesh_client.CLOSE_TIMEOUT). A second call does nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._started:
            for part, bound in ((self.routed_checks, CHECK_STOP_S), (self.session_audits, CHECK_STOP_S),
                                (self.spot_checks, CHECK_STOP_S), (self.dht_watch, DHT_WATCH_STOP_S)):
                if part is not None:
                    part.stop(timeout=bound)
        if self.mesh is not None:
            self.mesh.close()
