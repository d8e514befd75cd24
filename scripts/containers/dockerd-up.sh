#!/usr/bin/env bash
# Make sure a docker daemon answers on the default socket; start one if none does.
# Idempotent: a daemon that already answers is reused, whoever started it. Prints nothing on success
# but the daemon's version and storage driver.
#
# Storage driver: dockerd's own choice (overlay2 where the kernel has it), proven by running a container
# from a one-binary image; vfs only when that fails. vfs works everywhere but stores every layer and
# every container as a full copy of its file system: the CI's images, systemd hosts and fleet took
# 17 GB at peak with vfs (one CI run died of "no space left on device"); see docs/ansible.md.
# DOCKER_STORAGE_DRIVER=vfs (or any driver) skips the choice.
set -euo pipefail

DOCKER_DATA_ROOT=${DOCKER_DATA_ROOT:-/var/lib/docker}
DOCKER_LOG=${DOCKER_LOG:-/var/log/farworker-dockerd.log}
DOCKER_STORAGE_DRIVER=${DOCKER_STORAGE_DRIVER:-}

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
describe() { docker info --format "dockerd {{.ServerVersion}} ($1, storage driver {{.Driver}})"; }

if answers; then
    describe "already running"
    exit 0
fi

command -v dockerd >/dev/null || { echo "dockerd not found: apt-get install docker.io" >&2; exit 1; }
mkdir -p "$DOCKER_DATA_ROOT" /var/run

start_dockerd() {  # [--storage-driver=NAME]
    # setsid: the daemon must outlive this script and not share its process group (CI ends our jobs).
    setsid dockerd "$@" --data-root "$DOCKER_DATA_ROOT" \
        --pidfile /var/run/docker.pid -H unix:///var/run/docker.sock \
        >>"$DOCKER_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        answers && return 0
        sleep 1
    done
    echo "dockerd did not answer within 60 s; last log lines:" >&2
    tail -n 20 "$DOCKER_LOG" >&2
    exit 1
}

stop_dockerd() {
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
}

# A container from a one-binary image (the host's `true` and its libraries, imported: no registry):
# a driver that mounts its layers in this sandbox runs it.
runs_a_container() {
    local dir lib true_bin status=0
    true_bin=$(type -P true)  # the binary, not the shell's builtin
    dir=$(mktemp -d)
    mkdir -p "$dir/bin"
    cp "$true_bin" "$dir/bin/true"
    for lib in $(ldd "$true_bin" | grep -o '/[^ ]*'); do
        mkdir -p "$dir$(dirname "$lib")"
        cp -L "$lib" "$dir$lib"
    done
    tar -C "$dir" -c . | docker import - farworker/dockerd-probe:1 >/dev/null &&
        docker run --rm --network none farworker/dockerd-probe:1 /bin/true >>"$DOCKER_LOG" 2>&1 || status=$?
    docker image rm farworker/dockerd-probe:1 >/dev/null 2>&1 || true
    rm -rf "$dir"
    return "$status"
}

if [[ -n "$DOCKER_STORAGE_DRIVER" ]]; then
    start_dockerd --storage-driver="$DOCKER_STORAGE_DRIVER"
else
    start_dockerd
    if ! runs_a_container; then
        echo "dockerd's storage driver $(docker info --format '{{.Driver}}') cannot run a container here;" \
            "restarting dockerd with vfs (log: $DOCKER_LOG)" >&2
        stop_dockerd
        start_dockerd --storage-driver=vfs
    fi
fi
describe "started, log $DOCKER_LOG"
