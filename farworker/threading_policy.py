"""CPU threading policy, applied before torch is imported.

Idle OpenMP threads spin-wait after every torch op and hold a core that the server's other processes
(p2pd, DHT, handlers) need: on 2 cores a mesh step went from 11.3 ms to 6.4 ms with either policy below
(../shared/facts.md). The environment is inherited by every child process, so the server's handlers and
farworker's own clients (demo, coordinator) follow the same policy.
"""

from __future__ import annotations

import os
import sys

POLICY_ENV = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # keep all threads, but idle ones sleep
    "single": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "spin": {},  # torch's default: fastest for a lone process with cores to spare
}


# Measured side by side on 2 cores (benchmarks/RESULTS.md): `single` 1.14x raw petals, `passive` 0.99x.
# torchrun sets one OpenMP thread per process by default for the same reason; on GPU hosts the blocks run
# on the GPU and the host threads only feed it.
DEFAULT_POLICY = "single"


def apply_thread_policy(policy: str = DEFAULT_POLICY) -> None:
    """Set the OpenMP environment for `policy`; values the operator set explicitly are kept."""
    if policy not in POLICY_ENV:
        raise ValueError(f"thread policy must be one of {', '.join(POLICY_ENV)}, got {policy!r}")
    if "torch" in sys.modules and policy != "spin":
        # libgomp reads its environment once, when torch loads it; too late now for this process.
        import torch

        if policy == "single":
            torch.set_num_threads(1)
    for name, value in POLICY_ENV[policy].items():
        os.environ.setdefault(name, value)


def apply_requested_policy(flag_value: str | None) -> None:
    """Apply the policy the operator asked for (flag, else FARLABS_THREAD_POLICY, else the default) before
    the configuration is validated: validating multiaddrs imports hivemind, and with it torch. An invalid
    value is left to the configuration's error report."""
    requested = flag_value or os.environ.get("FARLABS_THREAD_POLICY") or DEFAULT_POLICY
    if requested in POLICY_ENV:
        apply_thread_policy(requested)
