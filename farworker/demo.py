"""`farworker demo`: the whole product on one machine, for real.

A bootstrap peer, the reference coordinator, and workers (`farworker run` processes) splitting the
embedded tiny model's blocks; a request routed through the coordinator; its tokens compared with plain
transformers on the same checkpoint; the earnings ledger. Exit 0 only when the tokens match.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import requests

from farworker.local_mesh import (
    ManagedProcess,
    WorkerHandle,
    shared_cache_dir,
    split_blocks,
    start_bootstrap_peer,
    start_worker,
    stop_all,
)
from farworker.local_reference import generate_locally, tokenize_locally
from farworker.process_tree import end_children
from farworker.threading_policy import apply_requested_policy
from farworker.tiny_model import TINY_CONFIG, TINY_MODEL_NAME, ensure_tiny_checkpoint

if TYPE_CHECKING:  # imported in the run, after the thread policy (torch loads with it)
    from farworker.coordinator.service import RunningCoordinator

PROMPT = "The mesh serves"  # the tiny model's weights are random: its text is noise, equal to local transformers'
WORKERS_STOP_TIMEOUT = 30.0  # seconds for all workers together to drain and exit, then their groups are killed


class StopRequested(BaseException):
    """Raised in the main thread by SignalStop's handler: ends the demo's run, not its stop. A BaseException, as
    KeyboardInterrupt is: code that catches Exception (a retry loop, a library) must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop:
    """SIGTERM or SIGINT ends the demo's run, once, and never its stop.

    Python's default ends the demo at once, and the mesh's processes (sessions of their own) lived on as orphans
    with their /dev/shm files. So the first signal raises StopRequested in the run. A signal that comes while the
    mesh is being stopped is only noted: raised there, it skipped the rest of the stop (a SIGTERM during the
    workers' drain left the bootstrap peer running and its file in /dev/shm). The exit status is 128 + the first
    signal's number either way, as for a process the signal ended.
    """

    def __init__(self):
        self.signum: int | None = None
        self._armed = True

    def install(self) -> SignalStop:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        return self

    def disarm(self) -> None:
        """From here on a signal is noted, not raised: the stop has begun."""
        self._armed = False

    def exit_status(self, code: int) -> int:
        return code if self.signum is None else 128 + self.signum

    def _on_signal(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self._armed:
            self._armed = False
            raise StopRequested(signum)


@dataclass
class DemoMesh:
    """What the demo started, so its stop ends exactly that, in order."""

    bootstrap: ManagedProcess | None = None
    handles: list[WorkerHandle] = field(default_factory=list)
    coordinator: RunningCoordinator | None = None

    def stop(self) -> None:
        if self.coordinator is not None:  # first: its petals client must not outlive the peers it talks to
            self.coordinator.stop()
        stop_all((handle.proc for handle in self.handles), timeout=WORKERS_STOP_TIMEOUT)  # drain together
        if self.bootstrap is not None:  # last: the workers announce their blocks offline through it
            self.bootstrap.stop()
        end_children()  # the coordinator's petals client's DHT and p2pd; then this tree's /dev/shm files go


def run_demo(max_tokens: int, workers: int, work_dir: str | None) -> int:
    apply_requested_policy(None)  # FARLABS_THREAD_POLICY: the demo's client shares the cores with the servers
    own_dir = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="farworker-demo-"))
    mesh = DemoMesh()
    stop = SignalStop().install()
    code = 1
    try:
        try:
            code = _run_mesh(mesh, work, max_tokens, workers)
        finally:
            stop.disarm()  # a signal here on is noted: nothing interrupts the stop below
    except StopRequested:  # raised at most once, and raising disarms: the stop below runs uninterrupted either way
        pass
    finally:
        mesh.stop()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return stop.exit_status(code)


def _run_mesh(mesh: DemoMesh, work: Path, max_tokens: int, workers: int) -> int:
    # After the policy: the coordinator's mesh client loads torch, and libgomp reads the policy once, at load.
    from farworker.coordinator.app import Settings
    from farworker.coordinator.service import RunningCoordinator

    started = time.monotonic()
    model = ensure_tiny_checkpoint(shared_cache_dir())
    say(f"model      {TINY_MODEL_NAME} ({TINY_CONFIG['num_hidden_layers']} blocks, built locally: {model})")
    mesh.bootstrap, peers = start_bootstrap_peer(work)
    say(f"bootstrap  {peers[0]}")
    coordinator = mesh.coordinator = RunningCoordinator(Settings(
        db_path=work / "coordinator.sqlite3", heartbeat_interval_s=2.0, model_path=model,
        model_name=TINY_MODEL_NAME, initial_peers=tuple(peers),
    )).start()
    say(f"coordinator {coordinator.url}")
    for i, span in enumerate(split_blocks(TINY_CONFIG["num_hidden_layers"], workers)):
        mesh.handles.append(start_worker(work, f"worker{i + 1}", coordinator.url, peers, span))
    for handle in mesh.handles:
        status = handle.wait_online()
        say(f"{handle.proc.name:<10} online: blocks {status['blocks'][0]}:{status['blocks'][1]}, "
            f"peer {status['peer_id']}")
    _wait_registered(coordinator.url, len(mesh.handles))

    # The first request loads the coordinator's petals client; time the second.
    warm_up = requests.post(f"{coordinator.url}/v1/completions", timeout=120,
                            json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    begin = time.perf_counter()
    answer = requests.post(f"{coordinator.url}/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    seconds = time.perf_counter() - begin
    if answer.status_code != 200:
        say(f"completion failed: HTTP {answer.status_code} {answer.text}")
        return 1
    completion = answer.json()
    choice = completion["choices"][0]
    mesh_ids = choice["token_ids"]
    prompt_ids, tokenizer = tokenize_locally(str(model), PROMPT)
    say(f"prompt     {PROMPT!r}")
    say(f"           ids {prompt_ids}")
    for span in completion["route"]:
        say(f"route      blocks {span['blocks'][0]}:{span['blocks'][1]} served by {span['peer_id']}")
    rate = len(mesh_ids) / seconds
    say(f"mesh       {len(mesh_ids)} tokens in {seconds:.2f} s ({rate:.1f} tokens/s): {choice['text']!r}")
    say(f"           ids {mesh_ids}")
    local_ids = generate_locally(str(model), prompt_ids, max_tokens)
    say(f"local      transformers greedy: {tokenizer.decode(local_ids, skip_special_tokens=True)!r}")
    say(f"           ids {local_ids}")
    match = mesh_ids == local_ids
    say(f"match      {'YES: the mesh returned exactly the local tokens' if match else 'NO'}")

    routed: dict[str, int] = {}
    for span in warm_up.json().get("route", []) + completion["route"]:
        routed[span["peer_id"]] = routed.get(span["peer_id"], 0) + span["tokens"]
    _show_ledger(coordinator.url, routed)
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0 if match else 1


def _wait_registered(url: str, count: int, timeout: float = 60.0) -> None:
    """Wait until every worker registered and sent a heartbeat, then show what the coordinator knows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = requests.get(f"{url}/v1/workers", timeout=5).json()["workers"]
        beating = [w for w in workers if w.get("state") == "online" and w.get("heartbeat_count", 0) > 0]
        if len(beating) >= count:
            for w in beating:
                say(f"registered {w['worker_id']} blocks {w['blocks'][0]}:{w['blocks'][1]}, heartbeat: earn rate "
                    f"{w['earn_rate_far_per_hour']:.4f} $FAR/h, {uptime_text(w)}")
            return
        time.sleep(0.5)
    raise RuntimeError(f"only some of {count} workers registered with the coordinator in {timeout:.0f} s")


def _show_ledger(url: str, routed: dict[str, int], timeout: float = 30.0) -> None:
    """Print the ledger once every worker's usage records cover the tokens the routes say it served.

    A worker writes a session's usage record when the session closes, just after the HTTP answer.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = requests.get(f"{url}/v1/workers", timeout=5).json()["workers"]
        served = {w["peer_id"]: w.get("tokens_served", 0) for w in workers}
        if all(served.get(peer, 0) >= tokens for peer, tokens in routed.items()):
            break
        time.sleep(0.5)
    say("ledger     worker                                          blocks  tokens  earned $FAR  rate $FAR/h  uptime")
    for w in workers:
        blocks = w.get("blocks") or [0, 0]
        say(f"           {w['peer_id']:<47} {blocks[0]}:{blocks[1]:<5} {w.get('tokens_served', 0):>6}  "
            f"{w.get('earnings_far', 0):>11.6f}  {w.get('earn_rate_far_per_hour', 0):>10.4f}  "
            f"{'new' if w.get('uptime_new') else format(w.get('uptime_pct', 0), '.0f') + '%'}")


def uptime_text(worker: dict) -> str:
    """Reliability and observed uptime, or "new" while too little is observed to judge (docs/trust.md)."""
    if worker.get("uptime_new"):
        return "uptime new (too little observed yet)"
    return f"reliability {worker['reliability']:.2f}, uptime {worker['uptime_pct']:.0f}%"


def say(line: str) -> None:
    click.echo(line)
