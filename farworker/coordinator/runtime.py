"""Runtime: the coordinator's background work (mesh client, routed checks, session audits, spot-check loop, DHT
watch), started
together and stopped once, each stop bounded. The loops that sweep every worker (probes, DHT watch) run only while
this replica holds the background-loops lease (services/lease.py), so they run once across replicas."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Gauge

from farworker.coordinator.dht_watch import LOOKUP_TIMEOUT_S, DhtWatch
from farworker.coordinator.mesh import CompletionsMesh
from farworker.coordinator.services import lease
from farworker.coordinator.services.audit import AuditSampler, SessionAudits
from farworker.coordinator.spot_check import RoutedChecks, SpotChecker, SpotCheckLoop
from farworker.mesh_client import CLOSE_TIMEOUT

CHECK_STOP_S = 10.0  # RoutedChecks.stop, SessionAudits.stop and SpotCheckLoop.stop: the check in progress
DHT_WATCH_STOP_S = LOOKUP_TIMEOUT_S + 5.0  # one DHT read
LEASE_STOP_S = 5.0  # the lease keeper: one database write
STOP_BOUND_S = 3 * CHECK_STOP_S + DHT_WATCH_STOP_S + LEASE_STOP_S + CLOSE_TIMEOUT + 5.0  # the whole stop, at worst

log = logging.getLogger("farworker.coordinator")


class Runtime:
    """What runs beside the HTTP routes, built from the settings: the mesh client only with a model, the routed
    checks with a sample share, the session audits with an audit share, the probe loop with a probe period, the
    DHT watch with a mesh view (each None otherwise). ``start()`` starts their threads; ``stop()`` ends everything,
    once, whoever calls it again."""

    def __init__(self, settings, store, workers, registry):
        self.settings, self.store = settings, store
        self.mesh = self.routed_checks = self.session_audits = self.spot_checks = self.dht_watch = None
        self._new: dict = {}  # attribute -> a new loop of that kind (a stopped thread cannot start again)
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
            mesh = self.mesh
            if settings.probe_period_s > 0:
                self._new["spot_checks"] = lambda: SpotCheckLoop(SpotChecker(mesh), store, settings.probe_period_s,
                                                                 workers.to_probe)
            if settings.watches_dht:
                self._new["dht_watch"] = lambda: DhtWatch(mesh, store, settings.heartbeat_interval_s,
                                                          settings.dht_prefix,
                                                          lambda: settings.model_blocks.get(settings.model_name),
                                                          workers.to_watch)
        for attribute, new in self._new.items():  # built now, started while this replica holds the lease
            setattr(self, attribute, new())
        workers.routed_checks, workers.session_audits = self.routed_checks, self.session_audits  # their counts
        self.lease = lease.Lease(store, lease.BACKGROUND_LOOPS, lease.holder_name(),
                                 lease.ttl_for(settings.heartbeat_interval_s))
        self._lease_held = Gauge("farworker_coordinator_lease_held",
                                 "1 while this replica holds the lease under which the probe loop and DHT watch run",
                                 registry=registry)
        self._loop_running = Gauge("farworker_coordinator_background_loop_running",
                                   "1 while this replica runs the loop (under the lease)", ["loop"], registry=registry)
        for attribute in self._new:
            self._loop_running.labels(attribute)
        self._leased_running = False
        self._keeper_stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_lease, name="lease-keeper", daemon=True)
        self._started = self._stopped = False
        self._lock = threading.Lock()

    def start(self) -> Runtime:
        """Starts the per-request check queues; the leased loops start at once if the lease is free (one replica,
        or the first), else when the lease keeper takes it."""
        with self._lock:
            if not self._started and not self._stopped:
                self._started = True
                for part in (self.routed_checks, self.session_audits):
                    if part is not None:
                        part.start()
                if self._new:
                    self._follow_lease(self.lease.hold(time.time()))
                    self._keeper.start()
        return self

    def lease_view(self) -> dict:
        """For /healthz: this replica's name, whether it holds the lease and runs the leased loops, and the row."""
        return {"holder": self.lease.holder, "held": self._leased_running, "loops": sorted(self._new),
                "lease": self.lease.store.lease(self.lease.name)}

    def _keep_lease(self) -> None:
        while not self._keeper_stop.wait(self.lease.retry_every_s):
            try:
                with self._lock:
                    if self._stopped:
                        return
                    self._follow_lease(self.lease.hold(time.time()))
                self._follow_quarantines()
            except Exception:  # a loop that failed to start or stop, or a database hiccup, must not end the keeper
                log.exception("lease keeper")

    def _follow_quarantines(self) -> None:
        """Route nothing to a worker another replica quarantined: the lease holder's probe loop excludes them from
        its own mesh client each round, the other replicas' mesh clients learn it here, every TTL/TRIES_PER_TTL."""
        if self.mesh is None or not self.mesh.loaded:
            return
        self.mesh.exclude_peers(self.store.quarantined_peers())

    def _follow_lease(self, held: bool) -> None:
        """Start the leased loops when this replica took the lease, stop them (bounded) when it lost it. Under
        self._lock."""
        if held == self._leased_running:
            return
        log.info("%s the background-loops lease (%s)", "took" if held else "lost", self.lease.holder)
        for attribute, new in self._new.items():
            if held:
                getattr(self, attribute).start()
            else:  # lost (the database away longer than the TTL): another replica runs them now
                getattr(self, attribute).stop(timeout=CHECK_STOP_S)
                setattr(self, attribute, new())  # a stopped thread cannot start again
            self._loop_running.labels(attribute).set(1 if held else 0)
        self._leased_running = held
        self._lease_held.set(1 if held else 0)

    def stop(self) -> None:
        """Bounded: the verification in progress (RoutedChecks.stop), the audit in progress (SessionAudits.stop), a
        probe (SpotCheckLoop.stop), one DHT read (DhtWatch.stop), the client's DHT and p2pd
        (mesh_client.CLOSE_TIMEOUT). A second call does nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._started:
            self._keeper_stop.set()
            if self._keeper.is_alive():
                self._keeper.join(LEASE_STOP_S)
            parts = [(self.routed_checks, CHECK_STOP_S), (self.session_audits, CHECK_STOP_S)]
            if self._leased_running:  # the others were never started
                parts += [(self.spot_checks, CHECK_STOP_S), (self.dht_watch, DHT_WATCH_STOP_S)]
            for part, bound in parts:
                if part is not None:
                    part.stop(timeout=bound)
            if self._leased_running:
                try:  # the other replicas take over now, not after the TTL
                    self.lease.release()
                except Exception:
                    log.exception("could not release the background-loops lease")
        if self.mesh is not None:
            self.mesh.close()
