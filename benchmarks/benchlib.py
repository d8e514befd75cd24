"""Shared pieces of the benchmarks: machine facts, servers as real processes, a mesh client process,
process-tree accounting (CPU time, RSS/PSS), and cleanup.

Servers are started by farworker.local_mesh.ManagedProcess, the launcher the demo and the tests use. Everything
listens on 127.0.0.1. Every process a benchmark starts is stopped in a `finally`: SIGTERM (farworker) or SIGINT
(petals' CLI turns it into a clean shutdown), then SIGKILL of the process group only after a bound. The
`torch_<pid>_*` files those processes leave in /dev/shm are removed (the pid in the name says whose they are;
nothing else is touched).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from farworker.identity import load_or_create  # noqa: E402  (after the checkout is on sys.path)
from farworker.local_mesh import ManagedProcess, farworker_command  # noqa: E402
from farworker.tiny_model import default_cache_root, ensure_tiny_checkpoint  # noqa: E402

WALLET = "0x" + "be" * 20
PROMPT_IDS = [1, 37, 101, 250, 7, 64, 311, 42]
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
PETALS_CLI = (
    "from farworker.petals.compat import import_petals; import_petals(); from petals.cli.run_server import main; main()"
)


# -- facts about the run ----------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import psutil

    versions = {}
    for name in ("torch", "transformers", "hivemind", "petals"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def median(values):
    return statistics.median(values) if values else None


def write_json(path: str | None, data: dict) -> None:
    text = json.dumps(data, indent=1, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The harness's environment without thread settings (the coordinator sets OMP_WAIT_POLICY in this
    process) or farworker/systemd variables, so each child gets exactly the policy we give it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in THREAD_VARS and not k.startswith("FARLABS_") and k != "NOTIFY_SOCKET"
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }
    )
    env.update(extra or {})
    return env


# -- process trees ----------------------------------------------------------------------------------
class Tree:
    """A started process and its descendants: pids seen, peak RSS, CPU time."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.seen: set[int] = {proc.pid}
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def processes(self):
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        self.seen.update(p.pid for p in procs)
        return procs

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(Exception):
                total += p.memory_info().rss
        return total

    def pss(self) -> int:
        return self.memory_full().get("pss", 0)

    def memory_full(self) -> dict[str, int]:
        """Summed PSS and USS (pages only this tree's processes hold, split fairly / private only)."""
        total = {"pss": 0, "uss": 0, "processes": 0, "main": {}, "children": {"rss": 0, "pss": 0, "uss": 0}}
        for p in self.processes():
            with contextlib.suppress(Exception):
                info = p.memory_full_info()
                total["pss"] += info.pss
                total["uss"] += info.uss
                total["processes"] += 1
                part = {"rss": info.rss, "pss": info.pss, "uss": info.uss}
                if p.pid == self.proc.pid:
                    total["main"] = part
                else:
                    for key, value in part.items():
                        total["children"][key] += value
        return total

    def cpu_seconds(self) -> dict[int, float]:
        """{pid: user+system seconds} for the live tree."""
        out = {}
        for p in self.processes():
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            if self.proc.poll() is not None:
                return
            self.peak_rss = max(self.peak_rss, self.rss())

    def close(self) -> None:
        self._stop.set()


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


@dataclass
class Server:
    kind: str  # "farworker" or "petals"
    launched: ManagedProcess
    initial_peer: str
    started_at: float  # time.monotonic() just before Popen
    notify: NotifySocket | None = None
    started_wall: float = 0.0  # time.time() just before Popen
    tree: Tree = field(init=False)

    def __post_init__(self):
        self.tree = Tree(self.proc)

    @property
    def proc(self) -> subprocess.Popen:
        return self.launched.process

    @property
    def log_path(self) -> Path:
        return self.launched.log_path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds from process start to READY=1 (farworker) or "Started" in the log (petals)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kind == "farworker" and self.notify and self.notify.ready_at:
                return self.notify.ready_at - self.started_at
            if self.kind == "petals" and self.log_started_at() is not None:
                return self.log_started_at() - self.started_at
            if not self.alive:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server not ready after {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def log_started_at(self) -> float | None:
        """time.monotonic() of hivemind's runtime logging "Started" (both servers print it), from the log
        line's own timestamp (millisecond resolution, no polling delay)."""
        at = self.log_line_wall_time("] Started")
        return None if at is None else self.started_at + (at - self.started_wall)

    def log_line_wall_time(self, needle: str) -> float | None:
        for line in self.log_text().splitlines():
            if needle in line:
                try:
                    stamp = datetime.datetime.strptime(
                        f"{datetime.date.today().year} {line[:19]}", "%Y %b %d %H:%M:%S.%f"
                    )
                except ValueError:
                    return None
                return stamp.timestamp()
        return None

    def stop(self, timeout: float = 40.0) -> dict:
        """Stop cleanly, kill leftovers, remove the tree's /dev/shm torch files. Returns what happened."""
        import psutil

        self.tree.processes()  # record the latest pids
        self.tree.close()
        result = {"clean": True}
        if self.alive:
            # the launcher's stop signal (farworker: SIGTERM, petals' CLI: SIGINT), then SIGKILL of the group
            result["clean"] = self.launched.stop(timeout) != -signal.SIGKILL
        result["returncode"] = self.proc.returncode
        # descendants that outlived the main process (same session: we started it with a new one)
        leftovers = []
        for pid in self.tree.seen - {self.proc.pid}:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if (p.ppid() == 1 or p.ppid() in self.tree.seen) and os.getsid(pid) == self.proc.pid:
                    leftovers.append(p)
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        gone, alive = psutil.wait_procs(leftovers, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        result["leftover_processes"] = len(leftovers)
        result["shm_files_removed"] = remove_shm_files(self.tree.seen)
        if self.notify:
            self.notify.close()
        return result


def remove_shm_files(pids: set[int]) -> int:
    removed = 0
    prefixes = tuple(f"torch_{pid}_" for pid in pids)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            if entry.name.startswith(prefixes):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; records when READY=1 arrives."""

    def __init__(self, directory: Path):
        self.path = directory / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.ready_at: float | None = None
        self.messages: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            text = data.decode(errors="replace")
            self.messages.append(text)
            if self.ready_at is None and "READY=1" in text.split("\n"):
                self.ready_at = now

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def tiny_model_dir() -> Path:
    return ensure_tiny_checkpoint(default_cache_root())


def _identity_peer(state_dir: Path, key_name: str, port: int) -> str:
    identity = load_or_create(state_dir / key_name)
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{identity.peer_id}"


def start_farworker(
    work: Path, name: str, api_url: str, *, model: str = "farworker-tiny-llama", extra_env: dict[str, str] | None = None
) -> Server:
    """`farworker run` holding every block of `model` in a new swarm, READY reported to our socket."""
    state = work / name / "state"
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    peer = _identity_peer(state, "identity.key", port)
    notify = NotifySocket(work)
    env = clean_env(
        {
            "FARLABS_WALLET_ADDRESS": WALLET,
            "FARLABS_API_BASE_URL": api_url,
            "FARLABS_MODEL_NAME": model,
            "FARLABS_TORCH_DTYPE": "float32",
            "FARLABS_DEVICE": "cpu",
            "FARLABS_HOST_MADDRS": f"/ip4/127.0.0.1/tcp/{port}",
            "FARLABS_STATE_DIR": str(state),
            "FARLABS_CACHE_DIR": str(default_cache_root()),
            "FARLABS_NEW_SWARM": "true",
            "FARLABS_PUBLIC_NAME": name,
            "NOTIFY_SOCKET": str(notify.path),
            **(extra_env or {}),
        }
    )
    started, wall = time.monotonic(), time.time()
    launched = ManagedProcess(name, farworker_command("run"), env, work / f"{name}.log", cwd=work).start()
    return Server("farworker", launched, peer, started, notify, wall)


def start_raw_petals(
    work: Path, name: str, model_dir: Path, num_blocks: int = 4, extra_args: list[str] | None = None
) -> Server:
    """petals' own CLI with its defaults (threads, handlers, ...): only what a private local mesh needs."""
    state = work / name
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    peer = _identity_peer(state, "identity.key", port)
    args = [
        sys.executable,
        "-c",
        PETALS_CLI,
        str(model_dir),
        "--new_swarm",
        "--num_blocks",
        str(num_blocks),
        "--torch_dtype",
        "float32",
        "--device",
        "cpu",
        "--throughput",
        "1",
        "--dht_prefix",
        "farworker-tiny-llama",
        "--skip_reachability_check",
        "--host_maddrs",
        f"/ip4/127.0.0.1/tcp/{port}",
        "--identity_path",
        str(state / "identity.key"),
        *(extra_args or []),
    ]
    started, wall = time.monotonic(), time.time()
    launched = ManagedProcess(name, args, clean_env(), work / f"{name}.log", cwd=work,
                              stop_signal=signal.SIGINT).start()
    return Server("petals", launched, peer, started, None, wall)


class MeshClientProcess:
    """benchmarks/bench_client.py in its own process, driven over stdin/stdout one generation at a time."""

    def __init__(
        self,
        work: Path,
        name: str,
        initial_peer: str,
        model_dir: Path,
        policy: str,
        dht_prefix: str = "farworker-tiny-llama",
        device: str = "cpu",
        dtype: str = "float32",
        extra_env: dict[str, str] | None = None,
    ):
        args = [
            sys.executable,
            str(BENCH_DIR / "bench_client.py"),
            "--peer",
            initial_peer,
            "--model",
            str(model_dir),
            "--policy",
            policy,
            "--dht-prefix",
            dht_prefix,
            "--device",
            device,
            "--dtype",
            dtype,
        ]
        self.name = name
        self.log_path = work / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the client process
        self.proc = subprocess.Popen(
            args,
            env=clean_env(extra_env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(work),
            start_new_session=True,
        )
        self.tree = Tree(self.proc)
        hello = self._read(timeout=180)
        if hello.get("ready") is not True:
            raise RuntimeError(f"{name} failed: {hello}")

    def _read(self, timeout: float) -> dict:
        result: dict = {}

        def read():
            line = self.proc.stdout.readline()
            result.update(json.loads(line) if line.strip() else {"error": "client exited"})

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive() or "error" in result:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name}: {result.get('error', 'timeout')}\n{tail}")
        return result

    def generate(self, prompt: list[int], new_tokens: int, timeout: float = 300) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        self.tree.close()
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()
        remove_shm_files(self.tree.seen)


def run_local(
    model_dir: Path,
    policy: str,
    new_tokens: int,
    reps: int,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float = 600,
) -> dict:
    """Local transformers greedy generation in a fresh process (nothing else of ours running)."""
    args = [
        sys.executable,
        str(BENCH_DIR / "bench_client.py"),
        "--local",
        "--model",
        str(model_dir),
        "--policy",
        policy,
        "--device",
        device,
        "--dtype",
        dtype,
        "--reps",
        str(reps),
        "--new-tokens",
        str(new_tokens),
    ]
    out = subprocess.run(args, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"local run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def coordinator(work: Path):
    """The reference coordinator on loopback, in a thread of this process (default 30 s heartbeats)."""
    from farworker.coordinator.app import Settings
    from farworker.coordinator.service import RunningCoordinator

    running = RunningCoordinator(Settings(db_path=work / "coordinator.sqlite3")).start()
    try:
        yield running
    finally:
        running.stop()


def shm_torch_files() -> set[str]:
    with contextlib.suppress(OSError):
        return {e.name for e in os.scandir("/dev/shm") if e.name.startswith("torch_")}
    return set()
