#!/usr/bin/env bash
# Build a wheelhouse for hosts that cannot reach a package index (air-gapped fleets, the test containers).
# Usage: scripts/build-wheelhouse.sh DIR
# DIR gets: a wheel of every pin in requirements/runtime.lock (built here for the sdist-only ones),
# the torch CPU wheel (TORCH_SPEC, default torch==2.13.0), and farworker's own wheel.
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
want=$( { cat "$lock"; echo "$TORCH_SPEC"; } | sha256sum | cut -d' ' -f1)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "wheelhouse $DIR: dependencies cached"
else
    rm -f "$stamp"
    echo "wheelhouse $DIR: downloading $(grep -cE '^[A-Za-z]' "$lock") pins + $TORCH_SPEC"
    # Wheels are picked for this machine's Python and glibc: build the wheelhouse on the hosts' OS
    # release (Debian 12 / Python 3.11 for the test containers).
    "$PYTHON" -m pip download --quiet --no-deps -d "$DIR" -r "$lock" "$TORCH_SPEC"
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
