"""The adversary harness (tests/adversaries/) really cheats: real `farworker run` workers, patched from outside
the package, serve a split tiny model; a petals client compares what the mesh returns with local transformers.

- decode-skip on 2:4: prefill positions match, every decode position is wrong, and greedy tokens differ from
  local transformers' (issue 18's report);
- decode-noise on 2:4: prefill positions match, decode positions are ~1 % off;
- framer on 0:2: with a client that names the next server (petals' server-to-server push), the honest 2:4 computes
  on the framer's altered push and the client's decode positions are wrong; the same mesh, a client without push
  (as the coordinator's), gets the right answer.
"""

from __future__ import annotations

import random

import pytest
from adversary import adversary_env, local_hidden_states, mesh_hidden_states, relative_errors

from farworker.local_mesh import start_bootstrap_peer, start_worker
from farworker.local_reference import generate_locally
from farworker.mesh_client import MeshClient
from farworker.tiny_model import TINY_MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # real workers altered on purpose
PROMPT_LENGTH, DECODE_STEPS = 6, 8
TOKENS = random.Random(18).sample(range(3, 500), PROMPT_LENGTH + DECODE_STEPS)
HONEST_ERROR = 1e-4  # float32 mesh vs float32 transformers: round-off only


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A bootstrap peer; each test starts its own pair of workers on it."""
    work = tmp_path_factory.mktemp("adversaries")
    peer, maddrs = start_bootstrap_peer(work)
    yield work, maddrs
    peer.stop()


def serve(mesh, first_env=None, second_env=None, tag=""):
    work, peers = mesh
    workers = [start_worker(work, f"first{tag}", "http://127.0.0.1:9", peers, "0:2", first_env),
               start_worker(work, f"second{tag}", "http://127.0.0.1:9", peers, "2:4", second_env)]
    for worker in workers:
        worker.wait_online(timeout=180)
    return workers


def stop(workers):
    for worker in workers:
        worker.proc.stop(timeout=20)


def hidden_errors(tiny_model, peers, **client_options) -> list[float]:
    client = MeshClient(tiny_model, peers, TINY_MODEL_NAME, **client_options)
    try:
        mesh = mesh_hidden_states(client, TOKENS, PROMPT_LENGTH)
    finally:
        client.close()
    return relative_errors(mesh, local_hidden_states(tiny_model, TOKENS))


def test_decode_skip_returns_inputs_on_decode_steps_and_the_client_gets_wrong_tokens(mesh, tiny_model):
    workers = serve(mesh, second_env=adversary_env("decode-skip"), tag="-skip")
    try:
        assert "adversary decode-skip: patched" in workers[1].proc.log_tail(400)
        errors = hidden_errors(tiny_model, mesh[1])
        client = MeshClient(tiny_model, mesh[1], TINY_MODEL_NAME)
        try:
            tokens = client.generate(TOKENS[:PROMPT_LENGTH], DECODE_STEPS, temperature=0).completion_ids
        finally:
            client.close()
    finally:
        stop(workers)
    assert max(errors[:PROMPT_LENGTH]) < HONEST_ERROR, errors  # the prefill is computed honestly
    assert min(errors[PROMPT_LENGTH:]) > 0.05, errors  # no decode step is
    assert tokens != generate_locally(str(tiny_model), TOKENS[:PROMPT_LENGTH], DECODE_STEPS), tokens


def test_decode_noise_is_one_percent_off_on_decode_steps_only(mesh, tiny_model):
    workers = serve(mesh, second_env=adversary_env("decode-noise"), tag="-noise")
    try:
        errors = hidden_errors(tiny_model, mesh[1])
    finally:
        stop(workers)
    assert max(errors[:PROMPT_LENGTH]) < HONEST_ERROR, errors
    assert all(5e-3 < error < 2e-2 for error in errors[PROMPT_LENGTH:]), errors


def test_framer_corrupts_its_neighbour_through_push_and_not_without_it(mesh, tiny_model):
    workers = serve(mesh, first_env=adversary_env("framer"), tag="-framer")
    try:
        pushed = hidden_errors(tiny_model, mesh[1])
        unpushed = hidden_errors(tiny_model, mesh[1], use_server_to_server=False)
    finally:
        stop(workers)
    assert max(pushed[:PROMPT_LENGTH]) < HONEST_ERROR, pushed  # the first step is never pushed
    assert min(pushed[PROMPT_LENGTH:]) > 0.05, pushed  # every decode step ran on the altered push
    assert max(unpushed) < HONEST_ERROR, unpushed
