"""What the HTTP worker puts in each request's WSGI environ for the application, beside
the request itself, and how the application reads it: the Flask app depends on these
keys, not on the worker. Under another WSGI server (Flask's test client) they are
absent: the worker is not stopping and nobody waited for a thread."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DRAINING = "gradcam.draining"  # a callable: True once the worker has been told to stop
THREAD_WAIT = "gradcam.thread_wait"  # (when it queued for a thread, the seconds it waited)


def draining(environ: Mapping[str, Any]) -> bool:
    """True once the worker serving this request is stopping (``/readyz`` answers 503)."""
    check = environ.get(DRAINING)
    return bool(check()) if callable(check) else False


def thread_wait(environ: Mapping[str, Any]) -> tuple[float, float] | None:
    """When the request queued for a request thread (``time.monotonic()``) and how long it
    waited for one; None outside the worker."""
    wait: tuple[float, float] | None = environ.get(THREAD_WAIT)
    return wait
