"""gunicorn's gthread worker, with the wait for a request thread made visible.

A gthread worker accepts connections up to ``worker_connections`` (1000 by
default) and queues each readable one for its thread pool. With more requests
in flight than threads, the rest wait in that pool's queue: invisible to
metrics, outside any deadline, and never refused. This worker stamps each
connection when it is queued, so that

- the wait shows in ``gradcam_requests_waiting_for_thread`` (how many, now) and
  in the ``thread_wait`` stage histogram (how long);
- a request's deadline counts from the moment it was queued, not from when a
  thread got to it;
- a request that already waited longer than ``max_queue_wait_s`` is refused
  with 503 ``overloaded`` at once (``app.py``), the same rule as the engine's
  queue: an overloaded service answers quickly instead of piling up work.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from service import metrics

_current = threading.local()


def thread_wait() -> tuple[float, float] | None:
    """For the request this thread handles: when it was queued for a thread
    (``time.monotonic()``) and how long it waited for one; None outside this worker."""
    value: tuple[float, float] | None = getattr(_current, "wait", None)
    return value


class TimedThreadWorker(ThreadWorker):
    def enqueue_req(self, conn: Any) -> None:
        conn.gradcam_queued_at = time.monotonic()
        metrics.WAITING_FOR_THREAD.inc()
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        metrics.WAITING_FOR_THREAD.dec()
        queued = getattr(conn, "gradcam_queued_at", None)
        _current.wait = None if queued is None else (queued, time.monotonic() - queued)
        try:
            return super().handle(conn)
        finally:
            _current.wait = None
