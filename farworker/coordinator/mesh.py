"""The coordinator's petals client: the shared generation client (farworker/mesh_client.py) plus what only
the coordinator does with the mesh: spot checks of one worker's block, and excluding quarantined workers.

Its completions' routes are *attested*: the coordinator vouches for its own requests by recording them.
"""

from __future__ import annotations

from farworker.mesh_client import (  # noqa: F401  (the coordinator's modules and tests import them from here)
    CLIENT_OPTIONS,
    GENERATION_ATTEMPTS,
    Generation,
    MeshError,
)
from farworker.mesh_client import MeshClient as GenerationClient


class MeshClient(GenerationClient):
    """The generation client, with the coordinator's own uses of the mesh."""

    # -- spot checks (coordinator/spot_check.py) ---------------------------------------------------------
    def model_config(self):
        with self._lock:
            return self._load().config

    def load_block(self, block: int):
        """One block of the model, from the coordinator's own copy, in float32 (the reference)."""
        import torch
        from petals.server.from_pretrained import load_pretrained_block

        return load_pretrained_block(str(self.model_path), block, config=self.model_config(), torch_dtype=torch.float32)

    def forward_through(self, peer_id: str, block: int, hidden):
        """Run ``hidden`` through ``block`` on the worker ``peer_id`` and no other (petals' rpc_forward)."""
        import copy

        import torch
        from petals.client.remote_sequential import RemoteSequential
        from petals.client.routing.sequence_manager import RemoteSequenceManager, SequenceManagerState

        with self._lock:
            main = self._load().transformer.h.sequence_manager
        config = copy.copy(main.config)
        config.allowed_servers, config.blocked_servers = [peer_id], None
        config.max_retries = 1  # one answer from that worker or a failed probe; never another server
        uid = f"{config.dht_prefix}.{block}"
        manager = RemoteSequenceManager(config, (uid,), dht=main.dht, state=SequenceManagerState(p2p=main.state.p2p))
        try:
            with torch.inference_mode():
                return RemoteSequential(config, sequence_manager=manager)(hidden)
        finally:
            manager.shutdown()

    # -- observed uptime (coordinator/dht_watch.py) ------------------------------------------------------
    def server_states(self, uids: list[str], timeout: float) -> list[dict[str, str]]:
        """Per block uid, {peer id (base58): ServerState name} of the newest DHT records (``latest``, as petals
        clients route: a first-found replica can still hold an older announcement)."""
        with self._lock:
            dht = self._load().transformer.h.sequence_manager.dht
        from petals.utils.dht import get_remote_module_infos  # after _load: petals imports through petals_compat

        infos = get_remote_module_infos(dht, uids, latest=True, return_future=True).result(timeout=timeout)
        return [{peer.to_base58(): server.state.name for peer, server in info.servers.items()} for info in infos]

    def exclude_peers(self, peer_ids: set[str]) -> None:
        """Route nothing more to these peers (quarantined workers); petals drops them at its next update."""
        from hivemind import PeerID

        with self._lock:
            manager = self._load().transformer.h.sequence_manager
            manager.blocked_servers = {PeerID.from_base58(p) for p in peer_ids} or None
        manager.update(wait=False)
