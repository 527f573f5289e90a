# syntax=docker/dockerfile:1
#
# The Seawall sidecar image. Build from the repository root (the compose file does this):
#   docker build -f compose/sidecar.Dockerfile -t seawall/sidecar:0.1.0 .
# Runs `sidecar run --config /etc/seawall/policy.yaml`; mount the policy there (read-only).

# ---- build: install the project into a virtualenv that is copied whole into the runtime stage ----------------
# Base pinned by exact version; bump deliberately (and in cleanup.Dockerfile too).
FROM python:3.11.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/seawall
ENV PATH=/opt/seawall/bin:$PATH

WORKDIR /src
# Only what the package build needs (.dockerignore keeps tests, caches and .git out of the context).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY cleanup ./cleanup
RUN pip install .

# ---- runtime ------------------------------------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm

# tini is PID 1: it forwards SIGTERM/SIGHUP to the sidecar (graceful drain, policy reload) and reaps zombies.
# Version pinned to Debian bookworm's package.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 seawall \
    && useradd --system --uid 10001 --gid seawall --no-create-home --shell /usr/sbin/nologin seawall

COPY --from=build /opt/seawall /opt/seawall
# No malloc settings here: `sidecar run` raises glibc's mmap/trim thresholds itself at start (proxy/allocator.py).
# `-e SIDECAR_MALLOC=off` keeps glibc's defaults; a GLIBC_TUNABLES naming glibc.malloc.* is obeyed as given.
ENV PATH=/opt/seawall/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /etc/seawall
# 9901: admin (/health /ready /live /metrics /breakers). Upstream listeners are per policy (15000-19999).
EXPOSE 9901

HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/live', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "sidecar"]
CMD ["run", "--config", "/etc/seawall/policy.yaml"]
