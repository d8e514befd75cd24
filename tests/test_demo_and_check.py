"""The README's main job (`farworker demo`) and the operator's preflight (`farworker check`), run for real."""

import json
import re
import subprocess
import sys
import time

import pytest
from shm_files import TreePids, torch_files_of

from farworker.local_mesh import base_env

pytestmark = pytest.mark.slow


def farworker(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "farworker", *args], env=base_env(env), capture_output=True,
                          text=True, timeout=timeout)


def test_demo_speaks_text_generates_matching_tokens_and_shows_the_ledger_and_leaves_no_shm_file():
    began = time.time()  # the /dev/shm files this demo's processes make are newer
    proc = subprocess.Popen([sys.executable, "-m", "farworker", "demo", "--max-tokens", "6"], env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = TreePids(proc.pid)  # its whole tree: bootstrap peer, coordinator, workers and their processes
    out, err = proc.communicate(timeout=300)
    pids = tree.close()
    assert proc.returncode == 0, out + err
    assert len(pids) > 10, pids  # bootstrap, coordinator, workers, their handlers and DHT processes were seen
    assert tree.makers(torch_files_of(pids, since=began)) == {}  # tests/test_shm_cleanup.py: the stops
    assert "match      YES" in out
    assert out.count("route      blocks") == 2
    lines = out.splitlines()
    # the text prompt, then its ids; the mesh's text, then its ids; the same for local transformers
    prompt = lines.index("prompt     'The mesh serves'")
    prompt_ids = json.loads(lines[prompt + 1].split("ids ", 1)[1])
    assert len(prompt_ids) == len("The mesh serves")  # the tiny tokenizer is byte-level, no merges
    mesh = next(i for i, line in enumerate(lines) if line.startswith("mesh       6 tokens in "))
    assert re.search(r"tokens/s\): '.*'$", lines[mesh]), lines[mesh]
    assert len(json.loads(lines[mesh + 1].split("ids ", 1)[1])) == 6
    local = next(i for i, line in enumerate(lines) if line.startswith("local      transformers greedy: "))
    assert lines[mesh].split("tokens/s): ", 1)[1] == lines[local].split("greedy: ", 1)[1]  # the same text
    # Two requests: a 1-token warm-up and the 6-token one; the last token is never fed back.
    ledger = out.split("ledger")[1].splitlines()[1:3]
    n = len(prompt_ids)
    assert [int(line.split()[2]) for line in ledger] == [n + n + 6 - 1] * 2, out
    # workers online since the start: "new", or observed up at least 95 % of the time
    for line in ledger:
        uptime = line.split()[-1]
        assert uptime == "new" or float(uptime.rstrip("%")) >= 95, line
    # no library warnings on either stream (FutureWarning, UserWarning, transformers' added-tokens advice), and no
    # traceback of an object collected at the end (hivemind's P2P.__del__ on a thread without an event loop)
    noise = [line for line in (out + err).splitlines()
             if "Warning" in line or "Special tokens have been added" in line or "Traceback" in line
             or "Exception ignored" in line]
    assert not noise, noise


def test_check_reports_each_item_warns_on_the_api_and_fails_on_an_unreachable_peer(bootstrap_peer, tmp_path):
    env = {
        "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20, "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
        "FARLABS_MODEL_NAME": "farworker-tiny-llama", "FARLABS_DEVICE": "cpu", "FARLABS_TORCH_DTYPE": "float32",
        "FARLABS_CACHE_DIR": str(tmp_path), "FARLABS_DHT_BOOTSTRAP": bootstrap_peer[0],
    }
    result = farworker("check", env=env)
    lines = result.stdout.splitlines()
    items = [line[5:].split(":")[0] for line in lines]
    assert items == ["configuration", "GPU", "VRAM", "disk", "/dev/shm", "bootstrap peers", "coordinator API",
                     "reachability"]
    assert lines[2].startswith("OK   VRAM: no GPU; would serve all 4 blocks on CPU"), result.stdout
    assert lines[5].startswith("OK   bootstrap peers: 1 of 1 reachable")
    # nothing listens on the discard port: `run` serves anyway and keeps usage in its outbox
    assert lines[6].startswith("WARN coordinator API") and "outbox" in lines[6]
    assert lines[7].startswith("OK   reachability: not known")  # no worker runs here yet
    assert result.returncode == 0, result.stdout

    closed = bootstrap_peer[0].replace(bootstrap_peer[0].split("/")[4], "9")  # same peer id, port 9
    result = farworker("check", env={**env, "FARLABS_DHT_BOOTSTRAP": closed})
    assert "FAIL bootstrap peers: 0 of 1 reachable" in result.stdout
    assert result.returncode == 1


def test_a_first_demo_builds_the_tiny_model_without_library_warnings(tmp_path):
    """On a fresh machine the demo first builds the tiny checkpoint, then tokenizes and generates locally: transformers
    imported outside petals' import warned FutureWarning twice, and the tokenizer's load gave its advice."""
    script = ("import pathlib, sys\n"
              "from farworker.tiny_model import ensure_tiny_checkpoint\n"
              "from farworker.local_reference import generate_locally, tokenize_locally\n"
              "model = str(ensure_tiny_checkpoint(pathlib.Path(sys.argv[1])))\n"
              "ids, _ = tokenize_locally(model, 'The mesh serves')\n"
              "print(generate_locally(model, ids, 2))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=base_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    noise = [line for line in (result.stdout + result.stderr).splitlines()
             if "Warning" in line or "Special tokens have been added" in line]
    assert not noise, noise
