"""CompletionsMesh: the shared generation client (farworker/mesh_client.py) plus what only the coordinator does
with the mesh: spot checks of one worker's block, the DHT's view for uptime, and excluding quarantined workers.

Its completions' routes are *attested*: the coordinator vouches for its own requests by recording them.
"""

from __future__ import annotations

from farworker.mesh_client import MeshClient
from farworker.petals import remote_blocks


class CompletionsMesh(MeshClient):
    """The generation client, with the coordinator's own uses of the mesh (petals' side: farworker/petals/
    remote_blocks.py)."""

    def _sequence_manager(self):
        with self._lock:
            return self._load().transformer.h.sequence_manager

    # -- spot checks (coordinator/spot_check.py) ---------------------------------------------------------
    def model_config(self):
        with self._lock:
            return self._load().config

    def load_block(self, block: int):
        """One block of the model, from the coordinator's own copy, in float32 (the reference)."""
        return remote_blocks.load_reference_block(self.model_path, block, self.model_config())

    def forward_through(self, peer_id: str, block: int, hidden):
        """Run ``hidden`` through ``block`` on the worker ``peer_id`` and no other."""
        return remote_blocks.forward_through(self._sequence_manager(), peer_id, block, hidden)

    # -- observed uptime (coordinator/dht_watch.py) ------------------------------------------------------
    def server_view(self, uids: list[str], timeout: float) -> tuple[list[dict[str, str]], dict[str, float]]:
        """Per block uid, {peer id (base58): ServerState name} of the newest DHT records; per peer its announced
        throughput."""
        return remote_blocks.server_view(self._sequence_manager().dht, uids, timeout)

    @property
    def loaded(self) -> bool:
        """The petals client is up (it loads on first use: nothing to exclude peers from before)."""
        return self._model is not None

    _excluded: frozenset[str] | None = None  # the peers petals was last told to route nothing to

    def exclude_peers(self, peer_ids: set[str]) -> None:
        """Route nothing to these peers (the quarantined workers: the whole set each time). The probe loop and the
        lease keeper both call this every round; petals is told only of a change."""
        with self._lock:
            if self._excluded == peer_ids:
                return
            remote_blocks.block_peers(self._load().transformer.h.sequence_manager, peer_ids)
            self._excluded = frozenset(peer_ids)
