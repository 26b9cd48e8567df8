# gradcam-service: the HTTP API on gunicorn, the bundled demo model by default.
#   docker build -t gradcam-service .
#   docker run -p 8000:8000 gradcam-service
# A models file and weights: mount them and set GRADCAM_MODELS_FILE.
# For a CPU-only image, pass your CPU wheel index for torch as a build argument:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<cpu wheel index> -t gradcam-service .
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . && useradd --system --uid 10001 --home-dir /app app

USER app
# Listen on every interface inside the container; the port is the default.
ENV GRADCAM_HOST=0.0.0.0 \
    GRADCAM_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"
CMD ["gradcam-service", "serve"]
