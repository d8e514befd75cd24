"""A private mesh on this machine, as real processes: a bootstrap peer and `farworker run` workers.

Used by `farworker demo`, the tests and the benchmarks (ManagedProcess is their one process launcher).
Everything listens on loopback only, and every process is stopped (SIGTERM, then SIGKILL after a bound) when
the mesh closes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from farworker.bootstrap_peer import MADDRS_FILE
from farworker.status_file import read_status
from farworker.tiny_model import default_cache_root

LOOPBACK_ANY_PORT = "/ip4/127.0.0.1/tcp/0"
DEMO_WALLET = "0x" + "f4" * 20


class MeshProcessError(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    """A child in a session of its own (so its whole tree can be ended), output appended to ``log_path``."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM  # farworker drains on SIGTERM; petals' own CLI shuts down on SIGINT

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.cwd, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        self.request_stop()
        return self.wait_stopped(time.monotonic() + timeout)

    def request_stop(self) -> None:
        """The stop signal, without waiting: the process drains and exits on its own time (see wait_stopped)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)

    def wait_stopped(self, deadline: float) -> int | None:
        """The exit status once the process ended; past ``deadline`` (time.monotonic()) its group is SIGKILLed."""
        if self.process is None:
            return None
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def stop_all(processes, timeout: float = 30.0) -> None:
    """Stop ``processes`` together: SIGTERM to each, then wait for all within one ``timeout`` (each one's drain
    and shutdown take seconds; one after another they add up)."""
    processes = list(processes)
    for process in processes:
        process.request_stop()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait_stopped(deadline)


def farworker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "farworker", *args]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARLABS_") and k != "NOTIFY_SOCKET"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start_bootstrap_peer(work_dir: Path, name: str = "bootstrap") -> tuple[ManagedProcess, list[str]]:
    state = work_dir / name
    peer = ManagedProcess(name, farworker_command("bootstrap"), base_env({
        "FARLABS_STATE_DIR": str(state), "FARLABS_HOST_MADDRS": LOOPBACK_ANY_PORT,
    }), work_dir / f"{name}.log").start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        maddrs_file = state / MADDRS_FILE
        if maddrs_file.is_file() and maddrs_file.read_text().strip():
            return peer, [line for line in maddrs_file.read_text().split() if "/127.0.0.1/" in line]
        if not peer.alive:
            break
        time.sleep(0.05)  # a cheap file check; the peer writes it a moment after it listens
    peer.stop()
    raise MeshProcessError(f"bootstrap peer did not start:\n{peer.log_tail()}")


def worker_env(work_dir: Path, name: str, api_url: str, initial_peers: list[str], blocks: str | None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "FARLABS_WALLET_ADDRESS": DEMO_WALLET,
        "FARLABS_API_BASE_URL": api_url,
        "FARLABS_MODEL_NAME": "farworker-tiny-llama",
        "FARLABS_TORCH_DTYPE": "float32",
        "FARLABS_DEVICE": "cpu",
        "FARLABS_HOST_MADDRS": LOOPBACK_ANY_PORT,
        "FARLABS_STATE_DIR": str(work_dir / name / "state"),
        "FARLABS_CACHE_DIR": str(shared_cache_dir()),
        "FARLABS_HEARTBEAT_INTERVAL": "2",
        "FARLABS_PUBLIC_NAME": name,
    }
    if initial_peers:
        env["FARLABS_DHT_BOOTSTRAP"] = ",".join(initial_peers)
    else:
        env["FARLABS_NEW_SWARM"] = "true"
    if blocks:
        env["FARLABS_BLOCK_INDICES"] = blocks
    env.update(extra or {})
    return base_env(env)


def shared_cache_dir() -> Path:
    """One weights/throughput cache for every local worker, so the tiny model is built once."""
    return default_cache_root()


@dataclass
class WorkerHandle:
    proc: ManagedProcess
    state_dir: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def status(self) -> dict | None:
        return read_status(self.state_dir)

    def wait_online(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status and status.get("state") == "online" and status.get("pid") == self.proc.process.pid:
                return status
            if not self.proc.alive:
                raise MeshProcessError(f"{self.proc.name} exited with {self.proc.process.returncode}:\n"
                                       f"{self.proc.log_tail()}")
            time.sleep(0.1)  # a small file read; every test that starts a worker waits here
        raise MeshProcessError(f"{self.proc.name} was not online after {timeout:.0f} s:\n{self.proc.log_tail()}")


def start_worker(work_dir: Path, name: str, api_url: str, initial_peers: list[str], blocks: str | None,
                 extra_env: dict[str, str] | None = None) -> WorkerHandle:
    env = worker_env(work_dir, name, api_url, initial_peers, blocks, extra_env)
    proc = ManagedProcess(name, farworker_command("run"), env, work_dir / f"{name}.log").start()
    return WorkerHandle(proc, Path(env["FARLABS_STATE_DIR"]), env)


def split_blocks(total: int, parts: int) -> list[str]:
    """'0:2', '2:4' for 4 blocks in 2 parts; the last part takes the remainder."""
    size = max(1, total // parts)
    spans = [(i * size, (i + 1) * size) for i in range(parts)]
    spans[-1] = (spans[-1][0], total)
    return [f"{start}:{end}" for start, end in spans]
