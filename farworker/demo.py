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
from pathlib import Path

import click
import requests

from farworker.local_mesh import shared_cache_dir, split_blocks, start_bootstrap_peer, start_worker, stop_all
from farworker.local_reference import generate_locally, tokenize_locally
from farworker.process_tree import end_children
from farworker.threading_policy import apply_requested_policy
from farworker.tiny_model import TINY_CONFIG, TINY_MODEL_NAME, ensure_tiny_checkpoint

PROMPT = "The mesh serves"  # the tiny model's weights are random: its text is noise, equal to local transformers'
WORKERS_STOP_TIMEOUT = 30.0  # seconds for all workers together to drain and exit, then their groups are killed


def run_demo(max_tokens: int, workers: int, work_dir: str | None) -> int:
    apply_requested_policy(None)  # FARLABS_THREAD_POLICY: the demo's client shares the cores with the servers
    # After the policy: the coordinator's mesh client loads torch, and libgomp reads the policy once, at load.
    from farworker.coordinator.app import Settings
    from farworker.coordinator.service import RunningCoordinator

    own_dir = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="farworker-demo-"))
    started = time.monotonic()
    model = ensure_tiny_checkpoint(shared_cache_dir())
    say(f"model      {TINY_MODEL_NAME} ({TINY_CONFIG['num_hidden_layers']} blocks, built locally: {model})")
    bootstrap, handles, coordinator = None, [], None

    def stop_on_signal(signum, _frame):
        # Python's default ends the demo at once, and the mesh's processes (sessions of their own) lived on as
        # orphans with their /dev/shm files: raise instead, so the `finally` below stops them.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        bootstrap, peers = start_bootstrap_peer(work)
        say(f"bootstrap  {peers[0]}")
        coordinator = RunningCoordinator(Settings(
            db_path=work / "coordinator.sqlite3", heartbeat_interval_s=2.0, model_path=model,
            model_name=TINY_MODEL_NAME, initial_peers=tuple(peers),
        )).start()
        say(f"coordinator {coordinator.url}")
        for i, span in enumerate(split_blocks(TINY_CONFIG["num_hidden_layers"], workers)):
            handles.append(start_worker(work, f"worker{i + 1}", coordinator.url, peers, span))
        for handle in handles:
            status = handle.wait_online()
            say(f"{handle.proc.name:<10} online: blocks {status['blocks'][0]}:{status['blocks'][1]}, "
                f"peer {status['peer_id']}")
        _wait_registered(coordinator.url, len(handles))

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
    finally:
        if coordinator is not None:  # first: its petals client must not outlive the peers it talks to
            coordinator.stop()
        stop_all((handle.proc for handle in handles), timeout=WORKERS_STOP_TIMEOUT)  # drain together, one deadline
        if bootstrap is not None:  # last: the workers announce their blocks offline through it
            bootstrap.stop()
        end_children()  # the coordinator's petals client's DHT and p2pd; then this tree's /dev/shm files go
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


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
