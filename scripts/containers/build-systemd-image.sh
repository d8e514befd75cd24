#!/usr/bin/env bash
# Build a Debian bookworm image that boots systemd, from debootstrap (no registry is reachable here).
# Usage: build-systemd-image.sh [TAG]   (default farworker/debian-systemd:bookworm)
# Cached by tag and recipe: an image built by this same script is reused. FORCE=1 rebuilds.
# Run it with the flags in systemd-run-flags.sh (docker 20.10's import cannot set STOPSIGNAL).
set -euo pipefail

TAG=${1:-farworker/debian-systemd:bookworm}
SUITE=${SUITE:-bookworm}

recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
if [[ "${FORCE:-0}" != 1 ]] \
    && [[ "$(docker image inspect -f '{{ index .Config.Labels "farworker.recipe" }}' "$TAG" 2>/dev/null)" == "$recipe" ]]; then
    echo "image $TAG: cached"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }

# The mirror is the one this host's apt already uses, so no address is written down here.
mirror=${DEBIAN_MIRROR:-}
if [[ -z "$mirror" ]]; then
    mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
        | grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
fi
[[ -n "$mirror" ]] || { echo "no Debian mirror found in apt's configuration; set DEBIAN_MIRROR" >&2; exit 1; }

# What ansible, molecule and the roles need on a target: python3 (+venv, apt bindings,
# python3-debian for deb822_repository; the containers cannot reach a mirror), systemd as PID 1, dbus for systemctl, procps/iproute2 for the fault checks, CA certificates.
packages=systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,python3-debian,procps,iproute2,ca-certificates,sudo,kmod,gnupg

rootfs=$(mktemp -d /var/tmp/farworker-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $SUITE from the host's mirror into $rootfs (1-2 minutes)"
debootstrap --variant=minbase --include="$packages" "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"

# mktemp -d made the tree's top 0700, and tar records it as the image's /: every non-root service
# would then fail to reach anything (systemd: 200/CHDIR, "journal socket: Permission denied").
chmod 0755 "$rootfs"
# Containers from one tree would share machine-id and journal (../shared/facts.md).
: >"$rootfs/etc/machine-id"
rm -rf "$rootfs/var/log/journal"/* "$rootfs/var/cache/apt/archives"/*.deb "$rootfs/var/lib/apt/lists"/*
# Units that cannot work in a container and only slow the boot.
for unit in systemd-remount-fs.service getty@tty1.service systemd-firstboot.service; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done

tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/sbin/init"]' --change 'ENV container=docker' --change "LABEL farworker.recipe=$recipe" \
    - "$TAG" >/dev/null
echo "image $TAG: built"
