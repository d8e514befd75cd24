#!/usr/bin/env bash
# Sets up .venv (with test tools) and runs lint and the Python tests: real petals servers, a real
# hivemind DHT, the reference coordinator over loopback HTTP, real SQLite and a Postgres the tests start themselves
# (Debian's postgresql, which setup.sh --dev installs). No network beyond loopback.
# The fault tests (marker "faults": a worker killed, stopped, wedged or altered, and its bounds waited out) are
# left to .ci/run, which runs them as a step of their own; `-m faults` here runs them alone, `-m ""` all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check farworker tests benchmarks
.venv/bin/python -m pytest -m "not faults" "$@"
