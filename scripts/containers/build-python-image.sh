#!/usr/bin/env bash
# Build a small Debian bookworm image with Python 3.11 (+venv) and tini, from debootstrap (no registry is
# reachable here): the CPU base for the farworker container image (Dockerfile's BASE_IMAGE).
# Usage: build-python-image.sh [TAG]   (default farworker/debian-python:bookworm)
# Cached by tag and recipe: an image built by this same script is reused. FORCE=1 rebuilds.
# Mirror lookup and cache check: lib.sh. no systemd in it (the worker is PID 1's child under tini).
set -euo pipefail

TAG=${1:-farworker/debian-python:bookworm}
SUITE=${SUITE:-bookworm}

# shellcheck source=scripts/containers/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
recipe=$(image_recipe "${BASH_SOURCE[0]}")
if image_is_cached "$TAG" "$recipe"; then
    echo "image $TAG: cached"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }

mirror=$(debian_mirror)

# python3 is 3.11 on bookworm; python3-venv brings ensurepip; tini reaps orphans and forwards signals.
packages=python3,python3-venv,tini,ca-certificates

rootfs=$(mktemp -d /var/tmp/farworker-pyroot.XXXXXX)
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "debootstrap $SUITE (minbase + $packages) from the host's mirror into $rootfs (about 1 minute)"
debootstrap --variant=minbase --include="$packages" "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log" >&2; exit 1; }

# mktemp -d made the tree's top 0700: as the image's / that locks every non-root user out of everything.
chmod 0755 "$rootfs"
: >"$rootfs/etc/machine-id"
rm -rf "$rootfs/var/cache/apt/archives"/*.deb "$rootfs/var/lib/apt/lists"/* "$rootfs/usr/share/doc"/* \
    "$rootfs/usr/share/man"/* "$rootfs/usr/share/locale"/*

tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' --change "LABEL farworker.recipe=$recipe" \
    - "$TAG" >/dev/null
echo "image $TAG: built ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
