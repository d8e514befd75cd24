"""`farworker bootstrap`: a DHT-only peer that private meshes use as their stable entry point.

Its identity key persists, so its multiaddr (which embeds the peer id) survives restarts and can be
written once into every worker's FARLABS_DHT_BOOTSTRAP.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from farworker.config import ConfigError, _bootstrap_list, _Invalid, _multiaddr_list
from farworker.identity import load_or_create
from farworker.notify import Notifier
from farworker.petals.compat import restore_hivemind_names
from farworker.process_tree import end_children

log = logging.getLogger("farworker.bootstrap")
MADDRS_FILE = "bootstrap-maddrs.txt"


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def run_bootstrap_peer(host_maddrs: str, announce_maddrs: str, identity: str | None, state_dir: str | None,
                       initial_peers: str) -> int:
    problems = []
    for env, raw, parse in (("FARLABS_HOST_MADDRS", host_maddrs, _multiaddr_list),
                            ("FARLABS_ANNOUNCE_MADDRS", announce_maddrs, _multiaddr_list),
                            ("FARLABS_DHT_BOOTSTRAP", initial_peers, _bootstrap_list)):
        try:
            parse(raw)
        except _Invalid:
            problems.append(f"{env}={raw!r} is invalid: expected comma-separated multiaddrs")
    if problems:
        raise ConfigError(problems)
    state = Path(state_dir or Path.home() / ".local" / "state" / "farworker")
    state.mkdir(parents=True, exist_ok=True)
    identity_path = Path(identity) if identity else state / "bootstrap-identity.key"
    load_or_create(identity_path)

    # Before the DHT starts: a stop asked for while it starts is kept, and the DHT is then shut down as usual
    # (Python's default would end this process at once and orphan the DHT's process and p2pd).
    notifier, stop = Notifier(), threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    hivemind = restore_hivemind_names()
    dht = hivemind.DHT(
        initial_peers=_split(initial_peers), host_maddrs=_split(host_maddrs),
        announce_maddrs=_split(announce_maddrs) or None, identity_path=str(identity_path), start=True,
        # A bootstrap peer relays nothing and serves no blocks; it must answer DHT queries directly.
        client_mode=False, use_relay=False, use_auto_relay=False, check_if_identity_free=False,
    )
    maddrs = [str(addr) for addr in dht.get_visible_maddrs()]
    (state / MADDRS_FILE).write_text("\n".join(maddrs) + "\n")
    log.info("Connected to DHT: bootstrap peer %s", dht.peer_id.to_base58())
    for addr in maddrs:
        print(addr, flush=True)

    notifier.ready(f"bootstrap peer {dht.peer_id.to_base58()}")
    period = min(notifier.watchdog_interval or 5.0, 5.0)
    while not stop.wait(period):
        if dht.is_alive():
            notifier.watchdog()
    notifier.stopping("stopping")
    dht.shutdown()
    end_children(timeout=5.0)  # the DHT's process and p2pd, within a deadline; then their /dev/shm files go
    return 0
