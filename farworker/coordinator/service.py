"""Running the coordinator: in the foreground (``farworker coordinator``) or in a thread (demo, tests)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import uvicorn

from farworker.coordinator.app import create_app
from farworker.coordinator.runtime import STOP_BOUND_S as RUNTIME_STOP_BOUND_S
from farworker.coordinator.settings import Settings
from farworker.process_tree import end_children
from farworker.threading_policy import apply_requested_policy

log = logging.getLogger("farworker.coordinator")

STOP_BOUND_S = RUNTIME_STOP_BOUND_S + 5.0  # uvicorn's graceful shutdown (timeout_graceful_shutdown), then the runtime


def _apply_thread_policy() -> None:
    # The completions route runs the petals client beside the mesh's servers: OpenMP threads must not
    # spin on cores the servers need (../shared/facts.md). Set before torch is imported; FARLABS_THREAD_POLICY
    # picks another, as for the worker.
    apply_requested_policy(None)


def _uvicorn_config(app, host: str, port: int, log_level: str):
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",  # the app's lifespan starts and stops its runtime (coordinator/runtime.py)
        timeout_graceful_shutdown=5,
    )


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8787, log_level: str = "info") -> None:
    """Run the coordinator in the foreground until SIGINT/SIGTERM."""
    _apply_thread_policy()
    if not logging.getLogger().handlers:  # registrations and deregistrations, one line each
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has finished, with the handlers it found installed:
    # with Python's defaults that killed the process there, before the cleanup below, and the petals client's
    # DHT process and p2pd lived on. Handlers that only note the signal let the cleanup run.
    stop_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_signals.append(signum))
    try:
        uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run()  # its lifespan stops the runtime
    finally:
        end_children(timeout=5.0)  # whatever the client's shutdown left: nothing outlives the coordinator
    if stop_signals:
        # Stopped by a signal and cleaned up: exit now. hivemind's client leaves non-daemon threads behind, and
        # the interpreter's exit would wait on them until systemd's SIGKILL (a 90 s coordinator restart).
        logging.shutdown()
        os._exit(0)


class RunningCoordinator:
    """A coordinator served from a background thread on loopback; ``stop()`` ends it, ``url`` reaches it."""

    def __init__(
        self, settings: Settings, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ):
        _apply_thread_policy()
        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port, log_level))
        self._server.install_signal_handlers = lambda: (
            None
        )  # not the main thread; the host process owns signals
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"coordinator-{self.port}",
            daemon=True,
        )

    @property
    def store(self):
        return self.app.state.store

    def start(self, timeout: float = 10.0) -> RunningCoordinator:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"coordinator did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0 + STOP_BOUND_S) -> None:
        """Ends the server; its lifespan stops the runtime and closes the store (within STOP_BOUND_S)."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> RunningCoordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
