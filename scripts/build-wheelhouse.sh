#!/usr/bin/env bash
# Build a wheelhouse for hosts that cannot reach a package index (air-gapped fleets, the test containers).
# Usage: scripts/build-wheelhouse.sh DIR
# DIR gets: a wheel of every pin in requirements/runtime.lock (built here for the sdist-only ones),
# the torch CPU wheel (TORCH_SPEC, default torch==2.13.0), and farworker's own wheel.
# GPU hosts and the CUDA image: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 takes torch from that
# index *with* its dependencies (the nvidia-* runtime wheels and triton), which the CPU build does not have.
# The dependency part is cached: it is redone only when runtime.lock or TORCH_SPEC changes.
# farworker's wheel is rebuilt every time (seconds) so the wheelhouse always carries the tree's code.
# Install from it:  pip install --no-index --find-links DIR torch==2.13.0
#                   pip install --no-index --find-links DIR --no-deps -r requirements/runtime.lock farworker
set -euo pipefail

DIR=${1:?usage: build-wheelhouse.sh DIR}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lock="$root/requirements/runtime.lock"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
stamp="$DIR/.deps-stamp"
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
want=$( { cat "$lock"; echo "$TORCH_SPEC $TORCH_INDEX_URL"; } | sha256sum | cut -d' ' -f1)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "wheelhouse $DIR: dependencies cached"
else
    rm -f "$stamp"
    echo "wheelhouse $DIR: downloading $(grep -cE '^[A-Za-z]' "$lock") pins + $TORCH_SPEC"
    # Wheels are picked for this machine's Python and glibc: build the wheelhouse on the hosts' OS
    # release (Debian 12 / Python 3.11 for the test containers).
    if [[ -n "$TORCH_INDEX_URL" ]]; then
        "$PYTHON" -m pip download --quiet --no-deps -d "$DIR" -r "$lock"
        "$PYTHON" -m pip download --quiet -d "$DIR" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        "$PYTHON" -m pip download --quiet --no-deps -d "$DIR" -r "$lock" "$TORCH_SPEC"
    fi
    # A few pins exist only as sdists (prefetch_generator, python-baseconv, varint, sdnotify):
    # hosts must not need a compiler or build backends, so turn them into wheels here.
    shopt -s nullglob
    for sdist in "$DIR"/*.tar.gz "$DIR"/*.zip; do
        echo "wheelhouse $DIR: building a wheel of $(basename "$sdist")"
        "$PYTHON" -m pip wheel --quiet --no-deps -w "$DIR" "$sdist"
        rm -f "$sdist"
    done
    shopt -u nullglob
    echo "$want" >"$stamp"
fi

rm -f "$DIR"/farworker-*.whl
"$PYTHON" -m pip wheel --quiet --no-deps -w "$DIR" "$root"
cp "$lock" "$DIR/runtime.lock"
echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
