#!/usr/bin/env bash
# Build a small Debian bookworm image with Python 3.11 (+venv) and tini, from debootstrap (no registry is
# reachable here): the CPU base for the farworker container image (Dockerfile's BASE_IMAGE).
# Usage: build-python-image.sh [TAG]   (default farworker/debian-python:bookworm)
# Cached by tag and recipe: an image built by this same script is reused. FORCE=1 rebuilds.
# Same mirror lookup as build-systemd-image.sh; no systemd in it (the worker is PID 1's child under tini).
set -euo pipefail

TAG=${1:-farworker/debian-python:bookworm}
SUITE=${SUITE:-bookworm}

recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
if [[ "${FORCE:-0}" != 1 ]] \
    && [[ "$(docker image inspect -f '{{ index .Config.Labels "farworker.recipe" }}' "$TAG" 2>/dev/null)" == "$recipe" ]]; then
    echo "image $TAG: cached"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }

mirror=${DEBIAN_MIRROR:-}
if [[ -z "$mirror" ]]; then
    mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
        | grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
fi
[[ -n "$mirror" ]] || { echo "no Debian mirror found in apt's configuration; set DEBIAN_MIRROR" >&2; exit 1; }

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
