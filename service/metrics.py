"""Every Prometheus metric of the service (``gradcam_`` prefix, base units).

Under ``gradcam-service serve`` the metrics are multiprocess: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` (and wipes it) before any of its children start;
the HTTP workers (requests, decoding, rendering), the engine processes (batches,
queue, compute) and the supervisor (restarts) each write their own files;
``gunicorn_conf.child_exit`` and the supervisor mark dead processes, and
``/metrics`` on any worker aggregates all of them. Gauges say how they combine
across processes (``livesum``: sum over live ones).

Labels come from closed sets, never from what a client sends as it is: route
templates (``unmatched`` for any other path), the HTTP methods the routes accept
(``other`` for any other token: HTTP allows any), the status codes and error codes
the service answers with, stages, and the configured models.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

# Latencies from a few ms (an idle healthz) to a minute (a big batch on a CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

REQUEST_DURATION = Histogram(
    "gradcam_request_duration_seconds",
    "HTTP request latency, by protocol (gradcam: /v1 and the rest; open_inference: /v2), "
    "route template and status.",
    ["protocol", "route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "gradcam_stage_duration_seconds",
    "Time per request in each stage: thread_wait (for an HTTP worker thread), decode (and "
    "fit to the model), of which fetch (from a DICOMweb server), queue_wait (for the "
    "model), compute, transport (to and from the engine, beyond queue_wait and compute), "
    "render, store (to a DICOMweb server).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_DURATION = Histogram(
    "gradcam_batch_duration_seconds",
    "Engine time per batch (forward, backward, CAM maths, copy back).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ENGINE_IDLE = Counter(
    "gradcam_engine_idle_seconds_total",
    "Seconds the engines' model loops waited with no request queued (1 - its rate: busy).",
)
BATCH_SIZE = Histogram(
    "gradcam_batch_size_images", "Images per engine call (micro-batch).", buckets=_BATCH_BUCKETS
)
QUEUE_DEPTH = Gauge(
    "gradcam_queue_depth",
    "Requests waiting for the model, summed over live engines.",
    multiprocess_mode="livesum",
)
WAITING_FOR_THREAD = Gauge(
    "gradcam_requests_waiting_for_thread",
    "Requests an HTTP worker has read but not yet given a thread, summed over live workers.",
    multiprocess_mode="livesum",
)
IN_FLIGHT = Gauge(
    "gradcam_requests_in_flight",
    "HTTP requests being handled, summed over live workers.",
    multiprocess_mode="livesum",
)
ERRORS = Counter("gradcam_errors_total", "Error responses, by stable error code.", ["code"])
IMAGES_EXPLAINED = Counter(
    "gradcam_images_explained_total", "Images explained, by model.", ["model"]
)
ENGINE_RESTARTS = Counter(
    "gradcam_engine_restarts_total", "Engine processes that exited and were restarted."
)
MODEL_LOAD_SECONDS = Gauge(
    "gradcam_model_load_seconds",
    "Time a worker took to load each model.",
    ["model"],
    multiprocess_mode="max",
)
PRECISION_FALLBACKS = Counter(
    "gradcam_precision_fallbacks_total",
    "Models asked to run in bfloat16 that failed the fidelity check and run in float32.",
    ["model"],
)
CUDA_GRAPH_FALLBACKS = Counter(
    "gradcam_cuda_graph_fallbacks_total",
    "(model, layer, method, batch size) keys whose CUDA graph capture failed or did not "
    "match the eager engine, so they run eagerly.",
    ["model"],
)
CUDA_GRAPH_REPLAYS = Counter(
    "gradcam_cuda_graph_replays_total",
    "Batches answered by replaying a captured CUDA graph (the rest run eagerly).",
    ["model"],
)
MODEL_INFO = Gauge(
    "gradcam_model_info",
    "Models served (value 1), with their default layer and device.",
    ["model", "arch", "layer", "device"],
    multiprocess_mode="max",
)


# The methods the routes accept; any other token is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})


def protocol(path: str) -> str:
    """Which door a request came through: the Open Inference Protocol's ``/v2`` or ours."""
    return "open_inference" if path == "/v2" or path.startswith("/v2/") else "gradcam"


def http_method(method: str) -> str:
    """``method`` as a label value: one of the routes' methods, or ``other``."""
    return method if method in _METHODS else "other"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def scrape() -> tuple[bytes, str]:
    """The text exposition of every metric (all workers' under gunicorn)."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve_on_port(port: int, host: str) -> None:
    """``/metrics`` of every process on its own port, from a thread of this process."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (gunicorn ``child_exit``)."""
    if multiprocess_dir():
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
