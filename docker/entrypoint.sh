#!/bin/sh
# Container entrypoint, run by tini (PID 1: reaps orphans, forwards SIGTERM). Arguments are a farworker
# command; the image's default is `run`. For `run` only:
#   - /dev/shm must be large enough (farworker.shm_guard; exit 78 with one clear line otherwise),
#   - a status file left by an earlier container on the same state volume is removed, so the
#     HEALTHCHECK cannot report "healthy" before this container's worker is online.
# Then exec: farworker is tini's direct child and gets SIGTERM from `docker stop` itself.
set -eu
if [ "${1:-run}" = run ]; then
    python -m farworker.shm_guard || exit $?
    rm -f "${FARLABS_STATE_DIR:?}/status.json"
fi
exec farworker "$@"
