# gradcam-service: the HTTP API on gunicorn, the bundled demo model by default.
#
#   docker build -t gradcam-service:0.1.0 .                    # torch from PyPI (CUDA build)
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> \
#       -t gradcam-service:0.1.0-cpu .                         # CPU-only torch, a far smaller image
#   docker run -p 8000:8000 gradcam-service:0.1.0
#
# BASE_IMAGE: any Debian-like image with python3 (3.11+) and its venv module.
# PIP_CERT, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL: pip's settings while building.
# TORCH_SPEC: what pip installs for torch, before anything else (a layer of its own).
# A models file and weights: mount them and set GRADCAM_MODELS_FILE.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ARG TORCH_SPEC="torch>=2.4 torchvision>=0.19"
# For builds behind a proxy or a mirror: a CA bundle and indexes for pip, used while
# building only (set when given, else pip's defaults).
ARG PIP_CERT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini as PID 1: signals reach serve, zombies are reaped. tcmalloc for the engines
# (GRADCAM_ENGINE_ALLOCATOR=auto finds it): no page faults per batch. Not
# version-pinned: the base image decides the Debian release.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends tini libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --create-home --home-dir /home/app app

# torch first: the largest layer, and the one that changes least.
# hadolint ignore=SC2086,DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC

# Then the dependencies, from pyproject.toml alone, so that a code change rebuilds
# only the last layer.
WORKDIR /app
COPY pyproject.toml README.md ./
# With the volumes extra (nibabel, pure Python): NIfTI volumes in and out.
# hadolint ignore=DL3013
RUN mkdir service && touch service/__init__.py \
    && pip install ".[volumes]" && pip uninstall -y gradcam-service \
    && rm -rf service build ./*.egg-info

COPY service ./service
RUN pip install --no-deps . && rm -rf build ./*.egg-info
# The synthetic phantoms the web page offers to try (no patient data, ~1 MB).
COPY examples/findings.json examples/phantom_* ./examples/
ENV GRADCAM_EXAMPLES_DIR=/app/examples

USER 10001
# Caches the service or torch may write go to the user's home; the engine sockets and
# the multiprocess metrics (TMPDIR) to a tmpfs.
ENV HOME=/home/app \
    TORCH_HOME=/home/app/.cache/torch \
    XDG_CACHE_HOME=/home/app/.cache \
    TMPDIR=/dev/shm \
    GRADCAM_HOST=0.0.0.0 \
    GRADCAM_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["tini", "--"]
CMD ["gradcam-service", "serve"]
