"""`farworker run` serves real Petals blocks; a real petals client gets exactly local transformers' tokens,
and the work is metered on the serving path into the durable outbox."""

import socket
import subprocess
import sys

import pytest
import requests
from dht_lookup import block_states
from open_session import open_session_after_steps
from polling import wait_for

from farworker.coordinator.mesh import CompletionsMesh as MeshClient
from farworker.local_reference import generate_locally
from farworker.outbox import Outbox

pytestmark = pytest.mark.slow
PROMPT = [1, 17, 230, 45, 99, 3]
NEW_TOKENS = 12




def test_two_workers_split_the_model_and_match_transformers(start_workers, bootstrap_peer, tiny_model):
    first = start_workers("w1", "0:2", bootstrap_peer)
    # The second worker bills every step as its own segment, as a long session would every 10 s.
    second = start_workers("w2", "2:4", bootstrap_peer, env={"FARWORKER_USAGE_SEGMENT_SECONDS": "0"})
    status_1, status_2 = first.wait_online(), second.wait_online()
    assert (status_1["blocks"], status_2["blocks"]) == ([0, 2], [2, 4])

    client = MeshClient(tiny_model, bootstrap_peer, "farworker-tiny-llama")
    try:
        generation = client.generate(PROMPT, NEW_TOKENS, temperature=0)
    finally:
        client.close()
    assert generation.completion_ids == generate_locally(str(tiny_model), PROMPT, NEW_TOKENS)
    served = {tuple(span["blocks"]): span["peer_id"] for span in generation.route}
    assert served == {(0, 2): status_1["peer_id"], (2, 4): status_2["peer_id"]}

    # Each worker processed the prompt, then one token per step; the last new token is never fed back.
    expected_tokens = len(PROMPT) + NEW_TOKENS - 1
    for worker in (first, second):
        status = wait_for(lambda w=worker: (s := w.status()) and s["counters"]["tokens_processed"] and s,
                          what="counters")
        assert status["counters"]["tokens_processed"] == expected_tokens
        assert status["counters"]["inference_steps"] == NEW_TOKENS
        # The coordinator is unreachable: the usage record waits on disk, not in memory.
        records = Outbox(worker.state_dir / "outbox.sqlite3").pending()
        assert sum(r["tokens"] for r in records) == expected_tokens
        assert sum(r["steps"] for r in records) == NEW_TOKENS
        assert {tuple(r["blocks"]) for r in records} == {tuple(status["blocks"])}
        assert len({r["id"] for r in records}) == len(records)
    assert len(Outbox(second.state_dir / "outbox.sqlite3").pending()) == NEW_TOKENS  # one record per step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_endpoint_and_stable_identity_across_restarts(start_workers):
    port = free_port()
    worker = start_workers("solo", "0:4", env={"FARLABS_METRICS_PORT": str(port)})
    peer_id = worker.wait_online()["peer_id"]
    healthy = 'farworker_healthy{model="farworker-tiny-llama"} 1.0'
    metrics = wait_for(lambda: (text := _scrape(port)) and healthy in text and text, what="healthy metrics")
    assert 'farworker_blocks_served{model="farworker-tiny-llama"} 4.0' in metrics
    assert "farworker_outbox_depth 0.0" in metrics

    shown = subprocess.run([sys.executable, "-m", "farworker", "status", "--state-dir", str(worker.state_dir)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "state          online" in shown.stdout
    assert "blocks         0:4" in shown.stdout
    assert f"peer id        {peer_id}" in shown.stdout
    assert "last heartbeat none yet" in shown.stdout  # the coordinator is unreachable in this test

    assert worker.proc.stop() == 0
    again = start_workers("solo", "0:4")
    assert again.wait_online()["peer_id"] == peer_id
    assert again.proc.stop() == 0
    stopped = subprocess.run([sys.executable, "-m", "farworker", "status", "--state-dir", str(again.state_dir)],
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 1 and "state          stopped" in stopped.stdout


def _scrape(port: int) -> str | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return None


@pytest.mark.faults  # stops a worker: .ci/run's fault step, not the README's test command
def test_sigterm_lets_an_open_session_finish_and_bills_all_of_it(start_workers, bootstrap_peer, tiny_model):
    """A drain announces the blocks offline, then waits for the open session: the client's steps after the
    SIGTERM still succeed, and every token of the session lands in the outbox before the worker exits."""
    import signal

    import torch

    worker = start_workers("drainer", "0:4", bootstrap_peer)
    peer_id = worker.wait_online()["peer_id"]
    client = MeshClient(tiny_model, bootstrap_peer, "farworker-tiny-llama")
    later_tokens = [5, 6, 7]
    try:
        client.warm()
        model = client._model
        embed = model.get_input_embeddings()
        with torch.inference_mode(), model.inference_session(max_length=len(PROMPT) + len(later_tokens)) as session:
            session.step(embed(torch.tensor([PROMPT])))
            worker.proc.process.send_signal(signal.SIGTERM)
            wait_for(lambda: "Waiting up to" in worker.proc.log_tail(60), 30, "the drain to wait for the session")
            # New sessions are routed elsewhere: the mesh lists every block of ours OFFLINE during the drain.
            wait_for(lambda: block_states(bootstrap_peer, peer_id) == ["OFFLINE"] * 4, 10, "the blocks OFFLINE")
            for token in later_tokens:  # the session keeps working while the worker drains
                outputs = session.step(embed(torch.tensor([[token]])))
                assert outputs.shape[:2] == (1, 1)
    finally:
        client.close()
    assert worker.proc.process.wait(60) == 0, worker.proc.log_tail()
    log = worker.proc.log_tail(80)
    assert "Stopped cleanly" in log and "still open" not in log, log
    records = Outbox(worker.state_dir / "outbox.sqlite3").pending()
    assert sum(r["tokens"] for r in records) == len(PROMPT) + len(later_tokens), records


@pytest.mark.faults  # kills a worker: .ci/run's fault step, not the README's test command
def test_sigkill_mid_session_bills_every_answered_step_once(start_workers, bootstrap_peer, tiny_model):
    """kill -9 while a session is open and its usage segment is not due yet (segments of an hour): every step
    the client got an answer for is held on disk, and the next start moves it to the outbox, once."""

    worker = start_workers("crasher", "0:4", bootstrap_peer, env={"FARWORKER_USAGE_SEGMENT_SECONDS": "3600"})
    worker.wait_online()
    outbox_path = worker.state_dir / "outbox.sqlite3"
    client = MeshClient(tiny_model, bootstrap_peer, "farworker-tiny-llama")
    later_tokens = [5, 6, 7]
    answered = len(PROMPT) + len(later_tokens)

    def held_tokens() -> int:
        return sum(segment["tokens"] for segment in Outbox(outbox_path).open_segments())

    try:
        # entered, never exited: the worker dies with the session open
        opened = open_session_after_steps(client, PROMPT, later_tokens)  # noqa: F841 - kept open until the kill
        # The handler holds a step right after sending its answer: allow it that moment, then kill.
        wait_for(lambda: held_tokens() == answered, 10, f"{answered} tokens held (now {held_tokens()})")
        worker.proc.kill()  # SIGKILL to the whole process group: the worker, its handlers, p2pd
    finally:
        client.close()
    assert Outbox(outbox_path).pending() == []  # nothing was reported before the kill

    restarted = start_workers("crasher", "0:4", bootstrap_peer)
    restarted.wait_online()
    records = Outbox(outbox_path).pending()
    assert [r["tokens"] for r in records] == [answered], records
    assert records[0]["steps"] == 1 + len(later_tokens)
    assert "Recovered 1 usage segments of sessions open when the last run stopped" in restarted.proc.log_tail(200)
    assert held_tokens() == 0


def test_every_rpc_that_computes_is_metered(start_workers, bootstrap_peer, tiny_model):
    """Forward and backward passes, unary and streamed (a request over 1 MiB comes in parts): each is a usage
    record of the tokens it processed. Before, only rpc_forward and inference steps were billed."""
    import torch

    worker = start_workers("trainer", "0:4", bootstrap_peer)
    worker.wait_online()
    client = MeshClient(tiny_model, bootstrap_peer, "farworker-tiny-llama")
    hidden_size = 128
    small, large = (1, 10), (8, 300)  # 5 KB (unary) and 1.2 MB (streamed) of float32 activations
    try:
        client.warm()
        blocks = client._model.transformer.h
        for batch, seq in (small, large):
            hidden = torch.randn(batch, seq, hidden_size, requires_grad=True)
            blocks(hidden).sum().backward()  # rpc_forward(_stream), then rpc_backward(_stream)
            assert hidden.grad is not None and hidden.grad.shape == hidden.shape
    finally:
        client.close()
    expected = 2 * (small[0] * small[1] + large[0] * large[1])  # every token forward and backward

    def billed() -> int:
        return sum(r["tokens"] for r in Outbox(worker.state_dir / "outbox.sqlite3").pending())

    wait_for(lambda: billed() == expected, 20, f"{expected} tokens billed (now {billed()})")
    records = Outbox(worker.state_dir / "outbox.sqlite3").pending()
    tokens = sorted(r["tokens"] for r in records)
    # the small pass is one request each way; petals' client sends the large one in sub-batches
    assert tokens[:2] == [10, 10] and sum(tokens[2:]) == 2 * 2400 and min(tokens[2:]) > 10, tokens
    assert all(r["blocks"] == [0, 4] for r in records)
