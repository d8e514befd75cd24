#!/usr/bin/env bash
# Make sure a docker daemon answers on the default socket; start one if none does.
# This machine's sandbox needs the vfs storage driver (../shared/facts.md). Idempotent: a daemon that
# already answers is reused, whoever started it. Prints nothing on success but the daemon's version.
set -euo pipefail

DOCKER_DATA_ROOT=${DOCKER_DATA_ROOT:-/var/lib/docker}
DOCKER_LOG=${DOCKER_LOG:-/var/log/farworker-dockerd.log}

if docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    docker version --format 'dockerd {{.Server.Version}} (already running)'
    exit 0
fi

command -v dockerd >/dev/null || { echo "dockerd not found: apt-get install docker.io" >&2; exit 1; }

mkdir -p "$DOCKER_DATA_ROOT" /var/run
# setsid: the daemon must outlive this script and not share its process group (CI ends our jobs).
setsid dockerd --storage-driver=vfs --data-root "$DOCKER_DATA_ROOT" \
    --pidfile /var/run/docker.pid -H unix:///var/run/docker.sock \
    >>"$DOCKER_LOG" 2>&1 </dev/null &

for _ in $(seq 1 60); do
    if docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
        docker version --format 'dockerd {{.Server.Version}} (started, log {{.Server.Os}}) ' | sed "s|log linux|log $DOCKER_LOG|"
        exit 0
    fi
    sleep 1
done
echo "dockerd did not answer within 60 s; last log lines:" >&2
tail -n 20 "$DOCKER_LOG" >&2
exit 1
