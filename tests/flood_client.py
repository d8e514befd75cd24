"""A flooding party for the tests and benchmarks: many fresh keys, signed registrations from a source address of
its own (another loopback address: 127.0.0.0/8 is all loopback on Linux), heartbeats that pretend to serve."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import requests
from coordinator_fixtures import heartbeat, registration
from cryptography.hazmat.primitives.asymmetric import rsa
from requests.adapters import HTTPAdapter

from farworker.identity import Identity

FLOOD_SOURCE = "127.0.0.2"  # the honest worker and the test's own calls come from 127.0.0.1
CHEAP_KEY_BITS = 1024  # the coordinator takes any RSA key; 1024 bits: ~6 ms a key, not ~60


class SourceAddress(HTTPAdapter):
    """Connections from ``source`` (urllib3's source_address)."""

    def __init__(self, source: str, **kwargs):
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(source: str = FLOOD_SOURCE, pool: int = 8) -> requests.Session:
    session = requests.Session()
    adapter = SourceAddress(source, pool_connections=pool, pool_maxsize=pool)
    session.mount("http://", adapter)
    return session


def fresh_identities(count: int, bits: int = CHEAP_KEY_BITS) -> list[Identity]:
    return [Identity(rsa.generate_private_key(public_exponent=65537, key_size=bits)) for _ in range(count)]


def post_signed(session: requests.Session, url: str, identity: Identity, path: str, payload: dict):
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **identity.sign("POST", path, body)}
    return session.post(url + path, data=body, headers=headers, timeout=30)


def register_all(url: str, identities: list[Identity], source: str = FLOOD_SOURCE, threads: int = 8,
                 **fields) -> list[requests.Response]:
    """One signed registration per identity (fresh keys, one source), ``threads`` at a time; answers in order."""
    with session_from(source, threads) as session, ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: post_signed(session, url, i, "/v1/workers/register",
                                                   {**registration(i), **fields}), identities))


def beat_all(url: str, accepted: list[tuple[Identity, str]], blocks=(0, 4), source: str = FLOOD_SOURCE) -> None:
    """One 'online' heartbeat from each (identity, worker id): they pretend to serve ``blocks``."""
    with session_from(source, 4) as session, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda a: post_signed(session, url, a[0], f"/v1/workers/{a[1]}/heartbeat",
                                            heartbeat(blocks=blocks)), accepted))
