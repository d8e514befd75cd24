"""What the coordinator sees of its workers in the mesh DHT, recorded per heartbeat interval for uptime.

A heartbeat is the worker's word; the DHT is what clients route by. Twice per heartbeat interval (so every
interval slot of every worker is looked at, whatever its phase against the worker's registration) the watch reads
the newest module infos of the served model's blocks and records, for each live worker, whether its whole
registered span is ONLINE under its peer id. Uptime then counts a slot only with a healthy beat AND an ONLINE
observation in it (services/uptime.up_intervals): a worker that beats but serves nothing, announces JOINING/OFFLINE,
or left the DHT while its heartbeat process keeps beating earns nothing for those intervals.
"""

from __future__ import annotations

import logging
import threading
import time

from farworker.coordinator.errors import StoreFull
from farworker.coordinator.services.ledger import online_slot
from farworker.coordinator.services.uptime import online_workers

log = logging.getLogger("farworker.coordinator.dht_watch")

LOOKS_PER_INTERVAL = 2
LOOKUP_TIMEOUT_S = 10.0  # one DHT read; a slower one is a missed look, not a stuck loop


class DhtWatch:
    """A thread that looks at the DHT ``LOOKS_PER_INTERVAL`` times per heartbeat interval until stopped."""

    def __init__(self, mesh, store, interval_s: float, dht_prefix: str, total_blocks, workers_to_watch):
        self.mesh, self.store, self.dht_prefix = mesh, store, dht_prefix
        self.period = interval_s / LOOKS_PER_INTERVAL
        self._total_blocks = total_blocks  # () -> the model's block count, or None while unknown
        self._workers_to_watch = workers_to_watch  # () -> rows of workers that may be serving
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dht-watch", daemon=True)

    def start(self) -> DhtWatch:
        self._thread.start()
        return self

    def stop(self, timeout: float = LOOKUP_TIMEOUT_S + 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def look(self) -> list[str]:
        """One look: the ids of the workers seen ONLINE, recorded in the store for this moment's slots."""
        rows = self._workers_to_watch()
        blocks = self._total_blocks()
        if not rows or not blocks:
            return []
        uids = [f"{self.dht_prefix}.{block}" for block in range(blocks)]
        states, throughputs = self.mesh.server_view(uids, timeout=LOOKUP_TIMEOUT_S)
        online = online_workers(rows, states)
        now = time.time()
        by_id = {row["worker_id"]: row for row in rows}
        slots = {w: online_slot(by_id[w]["registered_at"], now, by_id[w]["heartbeat_interval"]) for w in online}
        self.store.record_online({w: slot for w, slot in slots.items() if slot is not None})
        # what clients see each worker announce (the mesh page shows it; petals' routing weighs servers by it)
        self.store.record_throughput({w: throughputs[by_id[w]["peer_id"]] for w in online
                                      if by_id[w]["peer_id"] in throughputs})
        return online

    def _run(self) -> None:
        failing = None  # the last failure, said once and not every period (an unreadable checkpoint, a DHT away)
        while not self._stop.wait(self.period):
            try:
                self.look()
            except StoreFull:  # those slots are not recorded (disk full; write_refusals said so once): keep looking
                continue
            except Exception as err:  # the mesh not reachable yet, a slow DHT: those slots earn nothing; keep looking
                if str(err) != failing:
                    log.warning("could not read the DHT for observed uptime: %s", err)
                    failing = str(err)
                continue
            if failing is not None:
                log.info("reading the DHT for observed uptime again")
                failing = None
