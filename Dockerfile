# farworker container image: `farworker run` as a non-root user, the same pinned set as the venv install.
# One file for both images; they differ only in the wheelhouse (and TORCH_VARIANT, which checks it):
#
#   scripts/containers/build-python-image.sh farworker/debian-python:bookworm     # the base (debootstrap)
#   scripts/build-wheelhouse.sh wheelhouse                    # CPU: runtime.lock + torch +cpu + farworker
#   docker build -t farworker:cpu .
#   scripts/build-wheelhouse.sh --cuda wheelhouse-cuda        # GPU: PyPI's CUDA 13 torch + nvidia-* wheels
#   docker build --build-arg WHEELHOUSE=wheelhouse-cuda --build-arg TORCH_VARIANT=cuda -t farworker:cuda .
#
# No nvidia/cuda base: the CUDA runtime libraries come from the nvidia-* wheels, the driver from the host
# (NVIDIA Container Toolkit, `docker run --gpus all`).
# Build args:
#   BASE_IMAGE     any Debian/Ubuntu image. Python 3.11 (+venv) and tini are used when present (the base
#                  from scripts/containers/build-python-image.sh has both: no network needed); otherwise
#                  they are installed with apt (Ubuntu 22.04 ships python3.11 in universe).
#   WHEELHOUSE     the wheelhouse directory inside the build context (default: wheelhouse). Nothing is
#                  downloaded: every Python package comes from it (pip --no-index).
#   TORCH_SPEC     the torch requirement to install from the wheelhouse (default torch==2.13.0).
#   TORCH_VARIANT  cpu (default) or cuda: the torch build the wheelhouse must give; the build fails otherwise.
# See docs/docker.md.
ARG BASE_IMAGE=farworker/debian-python:bookworm

FROM ${BASE_IMAGE} AS base
# One layer: python3.11 (+venv) and tini from apt only when the base lacks them (the base from
# scripts/containers/build-python-image.sh has both: no network needed). / must be world-readable
# (a rootfs imported from a 0700 temporary directory is not) or the non-root user cannot run anything.
RUN set -eu; \
    chmod 0755 /; \
    if command -v python3.11 >/dev/null && python3.11 -c 'import ensurepip, venv' 2>/dev/null \
        && command -v tini >/dev/null; then exit 0; fi; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3.11 python3.11-venv tini ca-certificates; \
    rm -rf /var/lib/apt/lists/*

# The dependencies, without farworker's own wheel, so this stage stays cached while only farworker changes.
# A worker image: runtime.lock alone (the coordinator's extra, coordinator.lock, is not installed). The patterns
# copy every wheel but those starting with "fa" (farworker's own, and fastapi, which the worker does not use; a new
# worker dependency starting with "fa" fails the install below loudly: add a pattern for it).
FROM base AS deps
ARG WHEELHOUSE=wheelhouse
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_VARIANT=cpu
COPY ${WHEELHOUSE}/runtime.lock ${WHEELHOUSE}/[^f]*.whl ${WHEELHOUSE}/f[^a]*.whl /wheels/
# The install recipe of scripts/build-wheelhouse.sh: torch (with its dependencies, from the wheelhouse),
# then the exact lock with --no-deps (petals' own pins cannot install).
RUN set -eu; \
    python3.11 -m venv /opt/farworker; \
    pip="/opt/farworker/bin/pip --disable-pip-version-check --no-cache-dir --quiet"; \
    $pip install --no-index --find-links /wheels --no-deps "$(grep -E '^setuptools==' /wheels/runtime.lock)"; \
    $pip install --no-index --find-links /wheels "${TORCH_SPEC}"; \
    $pip install --no-index --find-links /wheels --no-deps -r /wheels/runtime.lock; \
    /opt/farworker/bin/python -c 'import sys, torch; \
variant = "cuda" if torch.version.cuda else "cpu"; \
sys.exit(None if variant == sys.argv[1] else \
         f"TORCH_VARIANT={sys.argv[1]} but the wheelhouse gave torch {torch.__version__} ({variant} build)")' \
        "${TORCH_VARIANT}"

FROM deps AS app
ARG WHEELHOUSE=wheelhouse
COPY ${WHEELHOUSE}/farworker-*.whl /wheels/
RUN set -eu; \
    /opt/farworker/bin/pip --disable-pip-version-check --no-cache-dir --quiet install --no-index --no-deps \
        /wheels/farworker-*.whl; \
    /opt/farworker/bin/python -m pip uninstall --quiet --yes pip; \
    /opt/farworker/bin/python -c 'from farworker.petals.compat import import_petals; import_petals()'

FROM base
ARG TORCH_VARIANT=cpu
LABEL farworker.torch-variant=${TORCH_VARIANT}
# Metadata first and the big venv copy last: with the vfs storage driver every step copies the whole
# file system, so every step after the 1.4 GB copy would cost a full copy of it.
ENV PATH=/opt/farworker/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin} \
    FARLABS_STATE_DIR=/var/lib/farworker \
    FARLABS_CACHE_DIR=/var/cache/farworker \
    HOME=/var/lib/farworker \
    HF_HOME=/var/cache/farworker/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# ^ what the NVIDIA Container Toolkit mounts from the host's driver with --gpus: CUDA (compute) and NVML,
#   nvidia-smi (utility; telemetry and `farworker check` read NVML). Unset, the toolkit gives utility only.
RUN set -eu; \
    groupadd --gid 10001 farworker; \
    useradd --uid 10001 --gid farworker --home-dir /var/lib/farworker --no-create-home \
        --shell /usr/sbin/nologin farworker; \
    install -d -o farworker -g farworker -m 0750 /var/lib/farworker /var/cache/farworker
# State: identity key (peer id), usage outbox, status file. Cache: model weights.
VOLUME ["/var/lib/farworker", "/var/cache/farworker"]
EXPOSE 31330/tcp
STOPSIGNAL SIGTERM
# Fresh status file + state online + healthy, as `farworker status` (and the systemd watchdog) decide.
# start-period covers loading weights; a big model on a slow disk may need `docker run --health-start-period`.
HEALTHCHECK --interval=10s --timeout=10s --start-period=300s --retries=3 \
    CMD ["/opt/farworker/bin/python", "/usr/local/lib/farworker/healthcheck.py"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/lib/farworker/entrypoint.sh"]
CMD ["run"]
USER farworker
COPY docker/entrypoint.sh docker/healthcheck.py /usr/local/lib/farworker/
COPY --from=app /opt/farworker /opt/farworker
