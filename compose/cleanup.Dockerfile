# syntax=docker/dockerfile:1
#
# The checkpoint-cleanup image. Build from the repository root (the compose file does this):
#   docker build -f compose/cleanup.Dockerfile -t seawall/checkpoint-cleanup:0.1.0 .
# It installs the `cleanup` extra only — mlflow-skinny (the tracking client, no server, no ML frameworks) and
# croniter — never the full `mlflow` package, which would add about a gigabyte for nothing.
# Default: run daily at 02:00 against $MLFLOW_TRACKING_URI and serve metrics on :9102.

# ---- build ---------------------------------------------------------------------------------------------------
# Base pinned by exact version; bump deliberately (and in sidecar.Dockerfile too).
FROM python:3.11.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/seawall
ENV PATH=/opt/seawall/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY cleanup ./cleanup
# DL3013 wants pinned pip packages; the only thing named here is this project, whose dependency ranges are
# pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install '.[cleanup]' \
    # Fail the build if anything pulled in the full mlflow distribution.
    && if pip show mlflow >/dev/null 2>&1; then echo "full mlflow must not be installed" >&2; exit 1; fi

# ---- runtime -------------------------------------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm

# tini is PID 1: it forwards SIGTERM so a run in progress finishes cleanly, and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 seawall \
    && useradd --system --uid 10001 --gid seawall --no-create-home --shell /usr/sbin/nologin seawall \
    && mkdir -p /archive \
    && chown seawall:seawall /archive

COPY --from=build /opt/seawall /opt/seawall
ENV PATH=/opt/seawall/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_TRACKING_URI=http://mlflow:5000

USER 10001:10001
# The archive (and the JSON run reports) live here; mount a volume.
VOLUME ["/archive"]
# 9102: Prometheus metrics (checkpoint_cleanup_*).
EXPOSE 9102

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9102/metrics', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "checkpoint-cleanup"]
CMD ["--archive-path=/archive", "--report=/archive/reports/last-run.json", "--metrics-port=9102", "--schedule=0 2 * * *"]
