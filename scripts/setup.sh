#!/usr/bin/env bash
# Creates .venv with farworker, the exact runtime set and the coordinator's additions (the farworker[coordinator]
# extra: the demo and the tests run the reference coordinator). The pins are the Ansible role's own files,
# roles/farworker_package/files/{runtime,coordinator}.lock; a worker host gets runtime.lock alone.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    plus test and lint tools
# FARWORKER_TORCH picks the torch build: the default is the CPU build these machines carry;
# GPU hosts use e.g. FARWORKER_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
# FARWORKER_WHEELHOUSE=DIR installs everything from DIR with no package index (air-gapped hosts); build DIR
# with scripts/build-wheelhouse.sh on a connected machine of the same OS release and Python.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
install=(.venv/bin/python -m pip --disable-pip-version-check -q install)
if [ -n "${FARWORKER_WHEELHOUSE:-}" ]; then
  [ -d "$FARWORKER_WHEELHOUSE" ] || { echo "setup: FARWORKER_WHEELHOUSE=$FARWORKER_WHEELHOUSE is not a directory" >&2; exit 1; }
  install+=(--no-index --find-links "$FARWORKER_WHEELHOUSE")
else
  "${install[@]}" -U pip
fi
# shellcheck disable=SC2086  # FARWORKER_TORCH may carry pip options
"${install[@]}" ${FARWORKER_TORCH:-torch==2.13.0}
# Exact pins, no resolver: petals 2.2.0.post1's own pins cannot install today (see runtime.lock).
locks=roles/farworker_package/files
"${install[@]}" --no-deps -r "$locks/runtime.lock" -r "$locks/coordinator.lock"
if [ -n "${FARWORKER_WHEELHOUSE:-}" ]; then
  "${install[@]}" --no-deps farworker  # the wheel build-wheelhouse.sh made from this tree
else
  "${install[@]}" --no-deps -e .
fi
if [ "${1:-}" = "--dev" ]; then
  "${install[@]}" -r requirements/dev.txt
  # lm-evaluation-harness (the lm-eval test in tests/test_openai_api.py): heavy, and held to the runtime set by its locks
  "${install[@]}" -r requirements/eval.txt -c "$locks/runtime.lock" -c "$locks/coordinator.lock"
  # Debian packages the tests use: tests/test_clock_offset.py shifts a worker's clock with libfaketime;
  # tests/test_mesh_page.py drives the coordinator's page in chromium (Playwright's own browser download is not
  # reachable from these machines); the store's tests start their own Postgres server from Debian's postgresql
  # binaries (tests/postgres_server.py; /usr/lib/postgresql/N/bin); tests/test_haproxy_config.py runs the coordinator
  # role's haproxy.cfg on Debian's haproxy (in the foreground, on the test's own loopback ports)
  missing=()
  command -v faketime >/dev/null || missing+=(faketime)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
  [ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || missing+=(haproxy)
  if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
    # a fresh machine's package lists may be empty: update once when the plain install cannot find them
    "${sudo[@]}" apt-get install -y -q "${missing[@]}" || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q "${missing[@]}"; }
  fi
  # tests/test_monitoring.py: promtool checks monitoring/'s rules, and a prometheus of the test's own (own config,
  # loopback port, tmp storage) scrapes real workers. Where systemd runs, the package also starts a system
  # prometheus on :9090: the tests never use it.
  if ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
    sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
    prom=(apt-get install -y -q --no-install-recommends prometheus)
    "${sudo[@]}" "${prom[@]}" || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" "${prom[@]}"; }
  fi
fi
.venv/bin/farworker --version
