#!/usr/bin/env bash
# Build a wheelhouse for hosts that cannot reach a package index (air-gapped fleets, the test containers).
# Usage: scripts/build-wheelhouse.sh [--cuda] DIR
# DIR gets: a wheel of every pin in roles/farworker_package/files/runtime.lock and coordinator.lock (built here
# for the sdist-only ones), the two lock files,
# torch (TORCH_SPEC, default torch==2.13.0) and farworker's own wheel.
#   default  torch's CPU build, --no-deps (the CPU build needs nothing beyond the lock).
#   --cuda   the CUDA set for GPU hosts and the CUDA image: PyPI's own manylinux torch wheel *is* the CUDA 13
#            build; it comes with its dependencies (the nvidia-*-cu13 runtime wheels, cuda-bindings, triton),
#            constrained to the lock's pins. ~3.5 GB. bitsandbytes (in the lock) carries its CUDA libraries.
#            The download ignores this machine's pip configuration (--isolated): a configured find-links or
#            extra index holding a local `+cpu` torch would otherwise win. CUDA_INDEX_URL (default PyPI's
#            simple index) names another index with the same files (a mirror).
# The dependency part is cached: it is redone only when a lock, TORCH_SPEC or the set changes.
# farworker's wheel is rebuilt every time (seconds) so the wheelhouse always carries the tree's code.
# Install from it:  pip install --no-index --find-links DIR torch==2.13.0
#                   pip install --no-index --find-links DIR --no-deps -r DIR/runtime.lock farworker
#                   (a coordinator host adds -r DIR/coordinator.lock)
set -euo pipefail

variant=cpu
if [[ "${1:-}" == --cuda ]]; then variant=cuda; shift; fi
DIR=${1:?usage: build-wheelhouse.sh [--cuda] DIR}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CUDA_INDEX_URL=${CUDA_INDEX_URL:-https://pypi.org/simple}
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
locks="$root/roles/farworker_package/files"
lock="$locks/runtime.lock"
coordinator_lock="$locks/coordinator.lock"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
stamp="$DIR/.deps-stamp"
if [[ $variant == cuda ]]; then set_id="cuda $TORCH_SPEC $CUDA_INDEX_URL"; else set_id="$TORCH_SPEC "; fi
want=$( { cat "$lock" "$coordinator_lock"; echo "$set_id"; } | sha256sum | cut -d' ' -f1)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "wheelhouse $DIR: dependencies cached ($variant)"
else
    rm -f "$stamp"
    # torch is the one wheel whose other variant pip would still pick from the same directory (2.13.0+cpu
    # sorts above the CUDA build's 2.13.0). Other leftovers are only unused: the installs name exact pins,
    # and keeping them spares a 2.7 GB download when only the lock moved.
    rm -f "$DIR"/torch-*.whl
    start=$SECONDS
    echo "wheelhouse $DIR: downloading $(cat "$lock" "$coordinator_lock" | grep -cE '^[A-Za-z]') pins + $TORCH_SPEC ($variant)"
    # Wheels are picked for this machine's Python and glibc: build the wheelhouse on the hosts' OS
    # release (Debian 12 / Python 3.11 for the test containers).
    if [[ $variant == cuda ]]; then
        "$PYTHON" -m pip download --isolated --disable-pip-version-check --quiet --only-binary=:all: \
            --index-url "$CUDA_INDEX_URL" -c "$lock" -d "$DIR" "$TORCH_SPEC"
        if ! compgen -G "$DIR/torch-*manylinux*.whl" >/dev/null || compgen -G "$DIR/torch-*+cpu*" >/dev/null; then
            echo "wheelhouse $DIR: $CUDA_INDEX_URL did not give torch's CUDA build:" "$DIR"/torch-* >&2
            exit 1
        fi
        "$PYTHON" -m pip download --quiet --no-deps -d "$DIR" -r "$lock" -r "$coordinator_lock"
    else
        "$PYTHON" -m pip download --quiet --no-deps -d "$DIR" -r "$lock" -r "$coordinator_lock" "$TORCH_SPEC"
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
    echo "wheelhouse $DIR: dependencies downloaded in $((SECONDS - start)) s"
fi

rm -f "$DIR"/farworker-*.whl
"$PYTHON" -m pip wheel --quiet --no-deps -w "$DIR" "$root"
cp "$lock" "$coordinator_lock" "$DIR/"
echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
