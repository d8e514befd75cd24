#!/usr/bin/env bash
# The `docker run` flags that boot systemd in a container on this kind of machine
# (--privileged is refused by the sandbox; ../shared/facts.md). Source it, then:
#   docker run -d "${SYSTEMD_RUN_FLAGS[@]}" IMAGE /sbin/init
# shellcheck disable=SC2034
SYSTEMD_RUN_FLAGS=(
    --cap-add SYS_ADMIN
    --security-opt seccomp=unconfined
    --cgroupns=host
    --tmpfs /run --tmpfs /run/lock
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw
    --stop-signal SIGRTMIN+3
)
