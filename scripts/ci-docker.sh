#!/usr/bin/env bash
# The container image's CI: build the image from a local base and the wheelhouse, then test it against
# the local docker daemon. Works on a fresh Debian 12 machine as root with no docker running and no
# registry reachable:
#   1. apt: docker.io, debootstrap       2. dockerd (overlay2; vfs fallback) 3. base image (debootstrap, cached by tag)
#   4. wheelhouse (cached; the CPU one shared with scripts/ci-molecule.sh at $FARWORKER_CI_CACHE/wheelhouse)
#   5. docker build --build-arg BASE_IMAGE=...  6. host venv for the tests (.venv; scripts/setup.sh)
#   7. pytest: tests/test_docker_image.py (CPU) or tests/test_cuda_image.py (cuda)
# Usage: scripts/ci-docker.sh [cuda] [pytest args...]
#   (default)  the CPU image farworker:ci, run on the tiny model in a private swarm.
#   cuda       the CUDA image farworker:ci-cuda from $FARWORKER_CI_CACHE/wheelhouse-cuda (PyPI's CUDA 13
#              torch, ~2.7 GB, downloaded once), checked without a GPU. Not in .ci/run: docs/docker.md has
#              its times.
# Env: FARWORKER_CI_CACHE (default .cache), FARWORKER_DOCKER_IMAGE (default farworker:ci, farworker:ci-cuda),
#      FARWORKER_DOCKER_BASE (default farworker/debian-python:bookworm, built here if missing).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
variant=cpu
if [[ "${1:-}" == cuda ]]; then variant=cuda; shift; fi
cache=${FARWORKER_CI_CACHE:-$root/.cache}
base=${FARWORKER_DOCKER_BASE:-farworker/debian-python:bookworm}
venv=$root/.venv
if [[ $variant == cuda ]]; then
    image=${FARWORKER_DOCKER_IMAGE:-farworker:ci-cuda}
    wheelhouse_dir=$cache/wheelhouse-cuda wheelhouse_flags=(--cuda) tests=tests/test_cuda_image.py label=worker-cuda
else
    image=${FARWORKER_DOCKER_IMAGE:-farworker:ci}
    wheelhouse_dir=$cache/wheelhouse wheelhouse_flags=() tests=tests/test_docker_image.py label=worker
fi

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
timings=()
timed() { local start=$SECONDS; "$@"; timings+=("$((SECONDS - start)) s  $*"); }

step "apt packages"
# shellcheck source=scripts/containers/lib.sh
source scripts/containers/lib.sh
ensure_apt_packages docker.io debootstrap

step "dockerd"
bash scripts/containers/dockerd-up.sh

step "base image $base"
if [[ "$base" == farworker/debian-python:* ]]; then
    timed bash scripts/containers/build-python-image.sh "$base"
else
    docker image inspect "$base" >/dev/null || { echo "base image $base not found locally" >&2; exit 1; }
fi

step "wheelhouse $wheelhouse_dir ($variant)"
timed bash scripts/build-wheelhouse.sh "${wheelhouse_flags[@]}" "$wheelhouse_dir"
# The build context: docker/ and this variant's wheelhouse only, as hard links (a copy across file
# systems), so neither build sends the other's wheels to the daemon (the CUDA set is 2.7 GB).
context=$cache/docker-context-$variant
rm -rf "$context"
mkdir -p "$context"
cp -a docker .dockerignore "$context/"
cp -al "$wheelhouse_dir" "$context/wheelhouse" 2>/dev/null || cp -a "$wheelhouse_dir" "$context/wheelhouse"

step "docker build $image (BASE_IMAGE=$base, TORCH_VARIANT=$variant)"
DOCKER_BUILDKIT=0 timed docker build -f Dockerfile --build-arg BASE_IMAGE="$base" --build-arg WHEELHOUSE=wheelhouse \
    --build-arg TORCH_VARIANT="$variant" --label farworker.image="$label" -t "$image" "$context"
rm -rf "$context"
# Drop this script's superseded images (untagged: earlier builds), not others'. With the vfs fallback
# driver each is a full copy of the file system.
docker image prune -f --filter label=farworker.image="$label" >/dev/null
docker image inspect -f '{{.Size}}' "$image" | awk -v i="$image" '{printf "image %s: %.2f GB\n", i, $1/1e9}'

step "host venv $venv (the tests' petals client)"
if ! "$venv/bin/python" -c 'import farworker, hivemind, pytest, pytest_timeout' 2>/dev/null; then
    timed bash scripts/setup.sh --dev   # what .ci/run's scripts/test.sh has usually done already
fi

step "pytest $tests"
if [[ $variant == cuda ]]; then export FARWORKER_CUDA_IMAGE=$image
else export FARWORKER_DOCKER_TESTS=1 FARWORKER_DOCKER_IMAGE=$image; fi
timed "$venv/bin/python" -m pytest -v -p no:cacheprovider "$tests" "$@"

step "done"
printf '%s\n' "${timings[@]}"
