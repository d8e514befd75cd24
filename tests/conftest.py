"""Fixtures that start real parts: the tiny checkpoint, a bootstrap peer, `farworker run` workers."""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import pytest

# The test process is a petals client sharing 2 cores with the servers it starts: don't spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from farworker.local_mesh import (  # noqa: E402
    WorkerHandle,
    shared_cache_dir,
    start_bootstrap_peer,
    start_worker,
    stop_all,
)


def _one_ast_parse_at_a_time() -> None:
    """CPython 3.11 keeps the AST builder's recursion depth once per interpreter, not per thread. Two threads inside
    ast.parse at once, each switched out by a finalizer that releases the GIL, leave each other's count behind:
    "SystemError: AST constructor recursion depth mismatch". Here that is pytest rewriting a module it imports (the
    hypothesis plugin's, at the session's end) while a coordinator thread loads the petals client (torch.jit.script
    parses source). Reproduced with three threads parsing beside finalizers that sleep(0): 1 error in 40 s, and 0
    with this lock. A test process only: the product parses nothing while it serves."""
    parse, lock = ast.parse, threading.RLock()

    def parse_alone(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    ast.parse = parse_alone


_one_ast_parse_at_a_time()

CLOSED_API = "http://127.0.0.1:9"  # discard port: nothing listens; workers keep serving and retry


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from farworker.tiny_model import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(shared_cache_dir())


@pytest.fixture(scope="session")
def tiny_files(tiny_model) -> dict[str, bytes]:
    """The tiny checkpoint's files as a hub repository serves them (tests/hub_server.py)."""
    from hub_server import checkpoint_files

    files = checkpoint_files(tiny_model)
    files.pop("farworker-tiny.json")  # our build marker, not part of a hub checkpoint
    return files


@pytest.fixture
def start_workers(tmp_path, tiny_model):
    """start_workers(name, blocks, initial_peers=[], api_url=CLOSED_API, **env) -> WorkerHandle; all stopped after."""
    handles: list[WorkerHandle] = []

    def start(name="worker", blocks="0:4", initial_peers=(), api_url=CLOSED_API, env=None) -> WorkerHandle:
        handle = start_worker(tmp_path, name, api_url, list(initial_peers), blocks, env)
        handles.append(handle)
        return handle

    yield start
    stop_all((handle.proc for handle in handles), timeout=45)  # together: each drain takes seconds


@pytest.fixture
def bootstrap_peer(tmp_path):
    peer, maddrs = start_bootstrap_peer(tmp_path)
    yield maddrs
    peer.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real Postgres for the session, started on first use (tests/postgres_server.py), stopped at the end."""
    from postgres_server import PostgresServer

    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_db(request, tmp_path):
    """A fresh, empty ledger database for a Store: a SQLite file, or a database of its own on the session's
    Postgres (a postgresql:// URL). Tests taking it run on both backends."""
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite"
    return request.getfixturevalue("postgres_server").new_database()
