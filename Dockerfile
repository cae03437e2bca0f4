# syntax=docker/dockerfile:1
# One image for the API and the workers. torch==2.14.1 from PyPI is a CUDA build: the same image
# runs on CPU hosts and, with the NVIDIA container toolkit, on GPU hosts.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# curl for the healthchecks; libgomp for torch's CPU kernels
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 lorita \
    && useradd --system --uid 10001 --gid lorita --home-dir /app --shell /usr/sbin/nologin lorita

WORKDIR /app

# the heavy, rarely changing layer first
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md* ./
COPY core ./core
COPY store ./store
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
COPY examples ./examples
RUN pip install . \
    && mkdir -p /data/artifacts /data/var /data/work \
    && chown -R lorita:lorita /data

ENV LORITA_ENV=production \
    LORITA_ARTIFACT_DIR=/data/artifacts \
    LORITA_WORK_DIR=/data/work \
    LORITA_LOG_FORMAT=json \
    LORITA_VAR_DIR=/data/var \
    LORITA_BROKER_DIR=/data/var/broker

USER lorita
VOLUME ["/data"]
EXPOSE 8000

# `api` (default) or `worker`; anything else is run as a command (e.g. `lorita db upgrade`)
COPY --chown=lorita:lorita --chmod=0755 docker/entrypoint.sh /usr/local/bin/lorita-entrypoint
ENTRYPOINT ["lorita-entrypoint"]
CMD ["api"]
