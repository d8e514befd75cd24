"""Ask the mesh itself, as a client would, what a peer announces for the tiny model's blocks."""

from __future__ import annotations

MODEL_PREFIX = "farworker-tiny-llama"


def block_states(initial_peers, peer_id: str, blocks=range(4)) -> list[str | None]:
    """The ServerState name this peer announces for each block (None where it announces nothing)."""
    from farworker.petals.compat import import_petals

    import_petals()
    import hivemind
    from petals.utils.dht import get_remote_module_infos

    dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=True)
    try:
        # latest: the newest record of each server across replicas, as petals clients route (a first-found
        # replica can still hold an older announcement)
        infos = get_remote_module_infos(dht, [f"{MODEL_PREFIX}.{i}" for i in blocks], latest=True)
        me = hivemind.PeerID.from_base58(peer_id)
        return [info.servers[me].state.name if info and me in info.servers else None for info in infos]
    finally:
        dht.shutdown()


def blocks_online_in_dht(initial_peers, peer_id: str) -> bool:
    return all(state == "ONLINE" for state in block_states(initial_peers, peer_id))
