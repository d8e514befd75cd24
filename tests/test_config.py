"""Configuration: every bad value named with what is accepted, all at once, exit status 78."""

import subprocess
import sys

import pytest

from farworker.config import EX_CONFIG, ConfigError, load_config

PEER = "QmYAM6qwoBS2ET8sW9DyZLiJK4Y6Ye2nAepQCiXfqxsX8v"
GOOD = {
    "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20,
    "FARLABS_DHT_BOOTSTRAP": f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}",
    "FARLABS_API_BASE_URL": "https://api.example.invalid",
}

INVALID = [
    ("FARLABS_WALLET_ADDRESS", "0x12", "0x followed by 40 hex digits"),
    ("FARLABS_WALLET_ADDRESS", "ab" * 21, "0x followed by 40 hex digits"),
    ("FARLABS_DHT_BOOTSTRAP", "10.0.0.5:31337", "multiaddrs with a peer id"),
    ("FARLABS_DHT_BOOTSTRAP", "/ip4/10.0.0.5/tcp/31337", "multiaddrs with a peer id"),
    ("FARLABS_DHT_BOOTSTRAP", "/ip4/1.2.3.4/tcp/1/p2p/notapeer", "multiaddrs with a peer id"),
    ("FARLABS_DHT_BOOTSTRAP", f"/ip4/999.2.3.4/tcp/1/p2p/{PEER}", "multiaddrs with a peer id"),
    ("FARLABS_DHT_BOOTSTRAP", f"/ip4/10.0.0.5/udp/31337/p2p/{PEER}", "multiaddrs with a peer id"),
    ("FARLABS_DHT_BOOTSTRAP", f"/dnsaddr/boot.example.com/p2p/{PEER}", "multiaddrs with a peer id"),
    ("FARLABS_DHT_BOOTSTRAP", f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER},/ip4/10.0.0.6/tcp/1/p2p/Qmabc",
     "multiaddrs with a peer id"),
    ("FARLABS_HOST_MADDRS", "/ip4/0.0.0.0/tcp/99999", "/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT"),
    ("FARLABS_HOST_MADDRS", "0.0.0.0:31330", "/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT"),
    ("FARLABS_ANNOUNCE_MADDRS", "/ip4/203.0.113.300/tcp/31330", "/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT"),
    ("FARLABS_ANNOUNCE_MADDRS", "/dns4/gpu1.example.com/udp/31330", "/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT"),
    ("FARLABS_API_BASE_URL", "ftp://api", "http:// or https:// URL"),
    ("FARLABS_API_BASE_URL", "http://a:8787,ftp://b", "several different ones separated by commas"),
    ("FARLABS_API_BASE_URL", "http://a:8787,,http://b:8787", "several different ones separated by commas"),
    ("FARLABS_API_BASE_URL", "http://a:8787,http://a:8787/", "several different ones separated by commas"),
    ("FARLABS_MODEL_NAME", "gpt2", "meta-llama/Llama-2-7b-chat-hf"),
    ("FARLABS_NUM_BLOCKS", "0", "from 1 to 1000, or auto"),
    ("FARLABS_NUM_BLOCKS", "many", "from 1 to 1000, or auto"),
    ("FARLABS_BLOCK_INDICES", "4:2", "start:end with start < end"),
    ("FARLABS_TORCH_DTYPE", "fp8", "float16, bfloat16, float32"),
    ("FARLABS_QUANT_TYPE", "int3", "auto, none, int8, nf4"),
    ("FARLABS_DEVICE", "tpu", "auto, cpu, cuda or cuda:N"),
    ("FARLABS_HEARTBEAT_INTERVAL", "0", "whole seconds from 1 to 3600"),
    ("FARLABS_PORT", "70000", "a port from 0 to 65535"),
    ("FARLABS_MAX_DISK_SPACE", "lots", "a size such as 200GB"),
    ("FARLABS_THREAD_POLICY", "turbo", "passive, single, spin"),
    ("FARLABS_NETWORK_MBPS", "-5", "a positive number"),
    ("FARLABS_NEW_SWARM", "maybe", "true or false"),
]


def test_good_config_parses_with_seed_defaults():
    config = load_config(GOOD)
    assert config.model_name == "meta-llama/Llama-2-7b-chat-hf"
    assert config.torch_dtype == "float16"
    assert config.location == "Unknown"
    assert config.heartbeat_interval == 30
    assert config.num_blocks is None  # auto from VRAM
    assert config.initial_peers == [GOOD["FARLABS_DHT_BOOTSTRAP"]]


@pytest.mark.parametrize(("env", "value", "accepted"), INVALID)
def test_each_invalid_variable_alone_is_named(env, value, accepted):
    with pytest.raises(ConfigError) as caught:
        load_config({**GOOD, env: value})
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert problem.startswith(env) and accepted in problem


def test_several_coordinator_replicas_are_kept_in_order():
    config = load_config({**GOOD, "FARLABS_API_BASE_URL": " http://b.example:8787/ , https://a.example "})
    assert config.api_base_urls == ("http://b.example:8787", "https://a.example")


def test_multiaddr_forms_the_daemon_accepts():
    bootstrap = (f"/dns/boot.example.com/tcp/31337/p2p/{PEER}, /dns4/boot.example.com/tcp/31337/p2p/{PEER},"
                 f"/ip6/2001:db8::7/tcp/31337/p2p/{PEER},/ip4/10.0.0.5/udp/31337/quic/p2p/{PEER},"
                 "/ip4/10.0.0.5/tcp/31337/p2p/12D3KooWBmwkafWE2fqfzS96VoTZMxnBcJJG5jQVWD6bcJzDrp8a")
    listen = "/ip4/0.0.0.0/tcp/0,/ip6/::/tcp/31330,/ip4/0.0.0.0/udp/31330/quic-v1"
    announce = f"/dns6/gpu1.example.com/tcp/31330,/ip4/203.0.113.7/tcp/1/p2p/{PEER}"
    config = load_config({**GOOD, "FARLABS_DHT_BOOTSTRAP": bootstrap, "FARLABS_HOST_MADDRS": listen,
                          "FARLABS_ANNOUNCE_MADDRS": announce})
    assert len(config.initial_peers) == 5 and config.initial_peers[1].startswith("/dns4/")
    assert config.listen_maddrs[1] == "/ip6/::/tcp/31330"
    assert len(config.announce_maddrs) == 2


def test_a_bad_multiaddr_says_which_and_why_on_one_line():
    cases = {
        "/ip4/1.2.3.4/tcp/1/p2p/notapeer": "peer id does not decode",
        f"/ip4/999.2.3.4/tcp/1/p2p/{PEER}": "not IPv4",
        f"/ip4/1.2.3.4/tcp/1/p2p/{PEER},/ip4/1.2.3.4/tcp/1": "/ip4/1.2.3.4/tcp/1: no /p2p/ peer id",
    }
    for value, reason in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config({**GOOD, "FARLABS_DHT_BOOTSTRAP": value})
        [problem] = caught.value.problems
        assert reason in problem and "\n" not in problem, problem


def test_several_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load_config({"FARLABS_WALLET_ADDRESS": "nope", "FARLABS_TORCH_DTYPE": "int4", "FARLABS_PORT": "x"})
    named = sorted(p.split("=")[0].split(" ")[0] for p in caught.value.problems)
    assert named == ["FARLABS_API_BASE_URL", "FARLABS_DHT_BOOTSTRAP", "FARLABS_PORT", "FARLABS_TORCH_DTYPE",
                     "FARLABS_WALLET_ADDRESS"]


def test_flag_wins_over_environment():
    config = load_config({**GOOD, "FARLABS_LOCATION": "Oslo"}, {"location": "Lagos"})
    assert config.location == "Lagos"


def test_bootstrap_not_required_for_a_new_swarm():
    env = {k: v for k, v in GOOD.items() if k != "FARLABS_DHT_BOOTSTRAP"}
    assert load_config({**env, "FARLABS_NEW_SWARM": "true"}).new_swarm is True


def test_local_model_needs_the_flag_and_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="FARLABS_MODEL_NAME"):
        load_config({**GOOD, "FARLABS_MODEL_NAME": str(tmp_path)})
    assert load_config({**GOOD, "FARLABS_MODEL_NAME": str(tmp_path), "FARLABS_ALLOW_LOCAL_MODEL": "1"}).is_local_model
    with pytest.raises(ConfigError, match="not a directory"):
        load_config({**GOOD, "FARLABS_MODEL_NAME": str(tmp_path / "nope"), "FARLABS_ALLOW_LOCAL_MODEL": "1"})


def test_hf_token_is_never_echoed():
    with pytest.raises(ConfigError) as caught:
        load_config({**GOOD, "HF_TOKEN": "hf_secret\x01"})
    assert "hf_secret" not in str(caught.value) and "HF_TOKEN" in str(caught.value)


def _run_cli(env_overrides: dict, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env_overrides}
    return subprocess.run([sys.executable, "-m", "farworker", "run", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_run_exits_78_with_one_line_per_problem_and_no_traceback():
    result = _run_cli({"FARLABS_WALLET_ADDRESS": "0x12", "FARLABS_TORCH_DTYPE": "fp8"})
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("config error: ") for line in lines), result.stderr
    assert any("FARLABS_WALLET_ADDRESS" in line for line in lines)
    assert any("FARLABS_TORCH_DTYPE" in line for line in lines)
    assert "Traceback" not in result.stderr


def test_run_with_a_peer_id_that_does_not_decode_exits_78_before_the_dht():
    result = _run_cli({**GOOD, "FARLABS_DHT_BOOTSTRAP": "/ip4/1.2.3.4/tcp/1/p2p/notapeer",
                       "FARLABS_HOST_MADDRS": "/ip4/0.0.0.0/tcp/99999"})
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line.split("=")[0] for line in lines] == ["config error: FARLABS_DHT_BOOTSTRAP",
                                                      "config error: FARLABS_HOST_MADDRS"], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_flag_is_validated_and_named():
    result = _run_cli(GOOD, "--heartbeat-interval", "soon")
    assert result.returncode == EX_CONFIG
    assert "--heartbeat-interval='soon' is invalid: expected whole seconds" in result.stderr


def test_check_config_only():
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **GOOD}
    ok = subprocess.run([sys.executable, "-m", "farworker", "check", "--config-only"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "farworker", "check", "--config-only"],
                         env={**env, "FARLABS_API_BASE_URL": "nope"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == EX_CONFIG and "FARLABS_API_BASE_URL" in bad.stdout
