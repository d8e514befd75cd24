"""One block of the mesh, through petals' internals: load the reference copy, run it on one named worker, read the
DHT's server states per block, and block peers from routing (the coordinator's spot checks and uptime watch)."""

from __future__ import annotations

import copy


def load_reference_block(model_path, block: int, config):
    """One block of the model, from a local checkpoint, in float32 (the reference)."""
    import torch
    from petals.server.from_pretrained import load_pretrained_block

    from farworker.petals.compat import MODULE_BUILD_LOCK

    with MODULE_BUILD_LOCK:  # init_empty_weights patches torch for the whole process (compat.MODULE_BUILD_LOCK)
        return load_pretrained_block(str(model_path), block, config=config, torch_dtype=torch.float32)


def forward_through(sequence_manager, peer_id: str, block: int, hidden):
    """Run ``hidden`` through ``block`` on the worker ``peer_id`` and no other (petals' rpc_forward), with the
    DHT and p2p of the client's own ``sequence_manager``."""
    import torch
    from petals.client.remote_sequential import RemoteSequential
    from petals.client.routing.sequence_manager import RemoteSequenceManager, SequenceManagerState

    config = copy.copy(sequence_manager.config)
    config.allowed_servers, config.blocked_servers = [peer_id], None
    config.max_retries = 1  # one answer from that worker or a failed probe; never another server
    uid = f"{config.dht_prefix}.{block}"
    manager = RemoteSequenceManager(config, (uid,), dht=sequence_manager.dht,
                                    state=SequenceManagerState(p2p=sequence_manager.state.p2p))
    try:
        with torch.inference_mode():
            return RemoteSequential(config, sequence_manager=manager)(hidden)
    finally:
        manager.shutdown()


def server_view(dht, uids: list[str], timeout: float) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Per block uid, {peer id (base58): ServerState name} of the newest DHT records (``latest``, as petals
    clients route: a first-found replica can still hold an older announcement); and per peer the throughput it
    announces with them (petals' ServerInfo.throughput, what clients' routing weighs servers by)."""
    from petals.utils.dht import get_remote_module_infos

    infos = get_remote_module_infos(dht, uids, latest=True, return_future=True).result(timeout=timeout)
    states = [{peer.to_base58(): server.state.name for peer, server in info.servers.items()} for info in infos]
    throughputs = {peer.to_base58(): float(server.throughput)
                   for info in infos for peer, server in info.servers.items() if server.throughput is not None}
    return states, throughputs


def block_peers(sequence_manager, peer_ids: set[str]) -> None:
    """Route nothing more to these peers; petals drops them at its next update (started here, not awaited)."""
    from hivemind import PeerID

    sequence_manager.blocked_servers = {PeerID.from_base58(p) for p in peer_ids} or None
    sequence_manager.update(wait=False)
