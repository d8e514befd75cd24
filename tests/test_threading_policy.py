"""The thread policy reaches libgomp: it must be in the environment before anything imports torch."""

import json
import subprocess
import sys

import pytest

# Records the OpenMP environment at the moment torch is first imported, then runs `farworker run` with a
# configuration that fails (no wallet) after validating a bootstrap multiaddr, which imports hivemind/torch.
PROBE = r"""
import json, os, sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")})
        return None

sys.meta_path.insert(0, Watch())
from farworker.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as stop:
    code = stop.code
import torch  # records now if the run never loaded it
print(json.dumps({"exit": code, "env": seen}))
"""

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmXfBBrxVVmM4gX9NwvARGgjTgaK3v4pjaRNrkpF6EAp3h"


@pytest.mark.parametrize(("flag", "env_policy", "expected"), [
    ([], None, {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None}),  # the default: single
    ([], "passive", {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": "PASSIVE"}),
    (["--thread-policy", "passive"], "single", {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": "PASSIVE"}),
])
def test_policy_is_set_before_torch_loads(flag, env_policy, expected, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FARLABS_DHT_BOOTSTRAP": PEER, "FARLABS_API_BASE_URL": "http://127.0.0.1:9",
           "FARLABS_STATE_DIR": str(tmp_path)}
    if env_policy:
        env["FARLABS_THREAD_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", PROBE, "run", *flag], env=env, capture_output=True, text=True,
                         timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exit"] == 78, out.stderr  # FARLABS_WALLET_ADDRESS is missing
    assert "FARLABS_WALLET_ADDRESS" in out.stderr
    assert result["env"] == expected, f"the OpenMP environment when torch loaded: {result['env']}"
