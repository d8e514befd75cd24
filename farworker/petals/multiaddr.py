"""Multiaddrs parsed as hivemind's DHT parses them (a /p2p/ peer id must decode).

hivemind 1.1.12 vendors py-multiaddr as hivemind.utils.multiaddr (there is no separate multiaddr package in
requirements/runtime.lock). Importing it imports hivemind and torch, so it is imported on the first parse: only
settings that are set pay for it.
"""

from __future__ import annotations


class MultiaddrError(ValueError):
    """Why the parser refused an address: the protocol it stopped at (None when it does not say) and why."""

    def __init__(self, protocol: str | None, reason: str):
        super().__init__(f"{protocol}: {reason}" if protocol else reason)
        self.protocol = protocol
        self.reason = reason


def protocol_names(address: str) -> list[str]:
    """'/ip4/10.0.0.5/tcp/31337/p2p/Qm...' -> ['ip4', 'tcp', 'p2p']; MultiaddrError when it does not parse."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        return [p.name for p in Multiaddr(address).protocols()]
    except Exception as error:  # the parser raises ValueError, LookupError and codec errors alike
        reason = getattr(error, "message", None) or str(error)
        raise MultiaddrError(getattr(error, "protocol", None), reason) from None
