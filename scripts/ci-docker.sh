#!/usr/bin/env bash
# The container image's CI: build the image from a local base and the wheelhouse, then test it against
# the local docker daemon (tests/test_docker_image.py). Works on a fresh Debian 12 machine as root with
# no docker running and no registry reachable:
#   1. apt: docker.io, debootstrap       2. dockerd (overlay2; vfs fallback) 3. base image (debootstrap, cached by tag)
#   4. wheelhouse (cached; shared with scripts/ci-molecule.sh at $FARWORKER_CI_CACHE/wheelhouse)
#   5. docker build --build-arg BASE_IMAGE=...  6. host venv for the test's petals client (.venv; scripts/setup.sh)
#   7. pytest tests/test_docker_image.py
# Usage: scripts/ci-docker.sh [pytest args...]
# Env: FARWORKER_CI_CACHE (default .cache), FARWORKER_DOCKER_IMAGE (default farworker:ci),
#      FARWORKER_DOCKER_BASE (default farworker/debian-python:bookworm, built here if missing).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cache=${FARWORKER_CI_CACHE:-$root/.cache}
image=${FARWORKER_DOCKER_IMAGE:-farworker:ci}
base=${FARWORKER_DOCKER_BASE:-farworker/debian-python:bookworm}
venv=$root/.venv

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

step "wheelhouse $cache/wheelhouse"
timed bash scripts/build-wheelhouse.sh "$cache/wheelhouse"
# The build context is the repository (.dockerignore sends only docker/ and the wheelhouse).
case "$cache/wheelhouse" in
    "$root"/*) wheelhouse=${cache#"$root"/}/wheelhouse ;;
    *)  # outside the tree: hard links (or a copy across file systems) into ./wheelhouse
        rm -rf wheelhouse
        cp -al "$cache/wheelhouse" wheelhouse 2>/dev/null || cp -a "$cache/wheelhouse" wheelhouse
        wheelhouse=wheelhouse ;;
esac

step "docker build $image (BASE_IMAGE=$base, WHEELHOUSE=$wheelhouse)"
DOCKER_BUILDKIT=0 timed docker build --build-arg BASE_IMAGE="$base" --build-arg WHEELHOUSE="$wheelhouse" \
    --label farworker.image=worker -t "$image" .
# Drop this script's superseded images (untagged: earlier builds), not others'. With the vfs fallback
# driver each is a full copy of the file system.
docker image prune -f --filter label=farworker.image=worker >/dev/null
docker image inspect -f '{{.Size}}' "$image" | awk -v i="$image" '{printf "image %s: %.2f GB\n", i, $1/1e9}'

step "host venv $venv (the test's petals client)"
if ! "$venv/bin/python" -c 'import farworker, hivemind, pytest, pytest_timeout' 2>/dev/null; then
    timed bash scripts/setup.sh --dev   # what .ci/run's scripts/test.sh has usually done already
fi

step "pytest tests/test_docker_image.py"
export FARWORKER_DOCKER_TESTS=1 FARWORKER_DOCKER_IMAGE=$image
timed "$venv/bin/python" -m pytest -v -p no:cacheprovider tests/test_docker_image.py "$@"

step "done"
printf '%s\n' "${timings[@]}"
