# Reference worker image (libs/worker, the `hive-worker` command). Build context: the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t hive-flow-c/worker .
# The worker only makes outgoing gRPC calls (registry and ticket service), so it exposes no
# port and has no HTTP health endpoint. Configuration: HIVE_WORKER_* (see libs/worker).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# uv from PyPI (works wherever PyPI does); pinned to the version that wrote uv.lock.
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
# Same interpreter path in both stages, so the venv is copied as is; no editable installs.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_FROZEN=1
WORKDIR /src
# Third-party dependencies first: this layer stays cached while only our sources change.
COPY pyproject.toml uv.lock ./
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/common/pyproject.toml libs/common/
COPY libs/worker/pyproject.toml libs/worker/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --no-dev --no-editable --no-install-workspace --package hive-worker
COPY libs/contracts/src libs/contracts/src
COPY libs/common/src libs/common/src
COPY libs/worker/src libs/worker/src
# --no-cache: uv caches wheels built from local directories keyed on their pyproject.toml,
# so with the cache mount a source-only change could ship a stale wheel; our members are
# always built afresh (the third-party packages are already in the venv).
RUN uv sync --no-dev --no-editable --no-cache --package hive-worker

FROM ${PYTHON_IMAGE} AS runtime
# A real passwd entry (tools that ask for the user name fail for a bare UID).
RUN groupadd --system --gid 10001 hive \
    && useradd --system --uid 10001 --gid hive --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin hive
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HIVE_WORKER_LOG_FORMAT=json
USER 10001:10001
# SIGTERM makes the worker drain: no new work, in-flight tasks finish (HIVE_WORKER_DRAIN_GRACE_SECONDS).
STOPSIGNAL SIGTERM
ENTRYPOINT ["hive-worker"]
