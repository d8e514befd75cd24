#!/usr/bin/env bash
# Build a Debian bookworm image that boots systemd, from debootstrap (no registry is reachable here).
# Usage: build-systemd-image.sh [TAG]   (default farworker/debian-systemd:bookworm)
# Cached by tag and recipe: an image built by this same script is reused. FORCE=1 rebuilds.
# Run it with the flags in systemd-run-flags.sh (docker 20.10's import cannot set STOPSIGNAL).
set -euo pipefail

TAG=${1:-farworker/debian-systemd:bookworm}
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
