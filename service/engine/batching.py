"""MicroBatcher: jobs from many requests, one model step at a time, in batches.

One consumer thread (the model loop) per engine. When the model is free it takes what is
queued, up to ``max_batch_size`` images: an idle server adds no wait to a lone
request, a busy one batches whatever arrived meanwhile. ``max_batch_delay_s``
(default 0) can add a wait, counted from the first queued item on a monotonic
clock. Items for different keys (model, layer) go to different batches;
different methods and targets share one (the method is post-processing).

A full queue refuses at once (``Overloaded``, 503): full means ``max_queue``
requests waiting, or more queued work than the model gets through in
``max_queue_wait_s`` at its measured pace (images weighed by ``Job.work``: faithfulness
curves cost more), so an overloaded service answers 503 in milliseconds instead
of letting every request wait towards its deadline.
A lone request is always taken. An item past its deadline is dropped before
compute (``DeadlineExceeded``, 504); a cancelled item (its client went away) is
skipped; once running, a cancelled item is marked abandoned, and a batch whose
items are all abandoned or late stops between its target rounds (the compute
function asks ``should_stop()``). If a batch raises, it is retried item by item,
so one poisoned image cannot fail its neighbours. ``close()`` fails what is queued, or with
``drain=True`` lets the model loop finish it first. If the model loop itself
dies (a bug outside the model call), ``alive`` turns false, queued requests
fail, and ``on_fatal`` runs: the engine process exits and is restarted.

The queued items, their futures and ``Abandoned`` are ``work_items``'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial

from service.contract.errors import DeadlineExceeded, EngineUnavailable, Overloaded
from service.engine.work_items import Abandoned, BatchKey, BatchStats, WorkItem, merge_jobs
from service.logs import log_failure, where
from service.transport.interface import Job, JobResult, JobTimings

logger = logging.getLogger(__name__)

# A job (one or several requests merged, in order) and a "should I stop?" question it
# asks between its expensive steps → its result, all on the CPU.
ComputeFn = Callable[[Job, Callable[[], bool]], JobResult]
# The pace estimate follows recent batches without jumping at one odd one.
_PACE_SMOOTHING = 0.2


class MicroBatcher:
    def __init__(
        self,
        compute: ComputeFn,
        *,
        max_batch_size: int = 16,
        max_batch_delay_s: float = 0.0,
        max_queue: int = 256,
        max_queue_wait_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        on_idle: Callable[[float], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_batch_delay_s < 0 or max_queue_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, the waits >= 0")
        self._compute = compute
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        # Seconds the model loop waited with nothing queued (engine idle time).
        self._on_idle = on_idle
        self._on_fatal = on_fatal
        self._pending: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._drain = False
        self._dead = False
        self._seconds_per_image: float | None = None
        self._running: list[WorkItem] = []
        self._thread = threading.Thread(target=self._run, name="gradcam-model-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the model loop has died or the batcher is closed."""
        return self._thread.is_alive() and not self._dead and not self._closed

    @property
    def depth(self) -> int:
        return len(self._pending)

    # --- producers -------------------------------------------------------------

    def submit(self, item: WorkItem) -> Future[JobResult]:
        """Queue ``item``; ``Overloaded`` at once if the queue is full or closing."""
        with self._cond:
            if self._closed or self._dead:
                raise Overloaded("The server is shutting down; retry on another replica.")
            if self._pending:
                if len(self._pending) >= self.max_queue:
                    raise Overloaded(
                        f"The queue is full ({self.max_queue} requests waiting); retry shortly.",
                        retry_after_s=1,
                    )
                wait_s = self._expected_wait_s()
                if wait_s is not None and wait_s > self.max_queue_wait_s:
                    raise Overloaded(
                        f"The model is {wait_s:.1f} s behind (limit {self.max_queue_wait_s:g} s);"
                        " retry shortly.",
                        retry_after_s=max(1, round(wait_s)),
                    )
            self._pending.append(item)
            self._report_depth()
            self._cond.notify()
        return item.future

    def _expected_wait_s(self) -> float | None:
        """How long a new item would wait before its compute starts, at the recent pace."""
        if not self.max_queue_wait_s or self._seconds_per_image is None:
            return None
        return sum(item.work for item in self._pending) * self._seconds_per_image

    def close(self, timeout_s: float = 10.0, drain: bool = False) -> None:
        """Stop taking work; fail what is queued (or, with ``drain``, compute it first);
        wait for the model loop to finish."""
        with self._cond:
            self._closed = True
            self._drain = drain
            pending = [] if drain else list(self._pending)
            if not drain:
                self._pending.clear()
            self._report_depth()
            self._cond.notify_all()
        _fail(pending, Overloaded("The server is shutting down; retry on another replica."))
        self._thread.join(timeout_s)

    # --- the model loop --------------------------------------------------------

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._pending))

    def _take_batch(self) -> list[WorkItem] | None:
        with self._cond:
            idle_from = time.monotonic() if not self._pending else None
            while not self._pending and not self._closed:
                self._cond.wait()
            if idle_from is not None and self._on_idle is not None:
                self._on_idle(time.monotonic() - idle_from)
            if not self._pending or (self._closed and not self._drain):
                return None
            first = self._pending[0]
            if self.max_batch_delay_s > 0 and not self._closed:
                until = first.enqueued_at + self.max_batch_delay_s
                while not self._closed and self._queued_images(first.key) < self.max_batch_size:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch: list[WorkItem] = []
            images = 0
            for item in list(self._pending):
                if item.key != first.key:
                    continue
                if batch and images + item.size > self.max_batch_size:
                    break
                batch.append(item)
                images += item.size
                self._pending.remove(item)
            self._report_depth()
            return batch

    def _queued_images(self, key: BatchKey) -> int:
        return sum(item.size for item in self._pending if item.key == key)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:
            self._die(error)

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live: list[WorkItem] = []
            for item in batch:
                if not item.future.set_running_or_notify_cancel():
                    continue  # cancelled: the client went away
                if now > item.deadline:
                    item.future.set_exception(
                        DeadlineExceeded(
                            "The request waited past its deadline before it could be computed; "
                            "the server is overloaded."
                        )
                    )
                    continue
                live.append(item)
            if live:
                self._running = live
                self._execute(live, now)
                self._running = []

    def _die(self, error: BaseException) -> None:
        log_failure(logger, "the model loop died", error, logging.CRITICAL)
        with self._cond:
            self._dead = True
            pending = list(self._pending)
            self._pending.clear()
            self._report_depth()
        failure = EngineUnavailable("The engine failed and is restarting; retry shortly.")
        for item in self._running:
            if not item.future.done():
                item.future.set_exception(failure)
        _fail(pending, failure)
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _execute(self, items: Sequence[WorkItem], started_wait: float) -> None:
        started = time.monotonic()
        try:
            result = self._compute(
                merge_jobs([item.job for item in items]), lambda: _all_given_up(items)
            )
        except Abandoned:
            _fail_given_up(items)
            return
        except Exception as error:  # delivered to the requests, never lost
            if len(items) == 1:
                items[0].future.set_exception(error)
                return
            logger.warning(
                "a batch of %d requests failed (%s at %s); retrying them one by one",
                len(items),
                type(error).__name__,
                where(error),
            )
            for item in items:
                try:
                    item.future.set_result(self._compute(item.job, partial(_all_given_up, [item])))
                except Abandoned:
                    _fail_given_up([item])
                except Exception as single:
                    item.future.set_exception(single)
            return
        compute_s = time.monotonic() - started
        images = sum(item.size for item in items)
        # Per plain explanation: a batch with faithfulness curves is not a slow engine.
        pace = compute_s / sum(item.work for item in items)
        self._seconds_per_image = (
            pace
            if self._seconds_per_image is None
            else ((1 - _PACE_SMOOTHING) * self._seconds_per_image + _PACE_SMOOTHING * pace)
        )
        offset = 0
        for item in items:
            timings = JobTimings(
                queue_wait_s=started_wait - item.enqueued_at,
                compute_s=compute_s,
                batch_images=images,
            )
            item.future.set_result(result.slice(offset, offset + item.size, timings))
            offset += item.size
        if self._on_batch is not None:
            self._on_batch(
                BatchStats(
                    images=images,
                    items=len(items),
                    queue_waits_s=tuple(started_wait - i.enqueued_at for i in items),
                    compute_s=compute_s,
                )
            )


def _all_given_up(items: Sequence[WorkItem]) -> bool:
    now = time.monotonic()
    return all(item.given_up(now) for item in items)


def _fail_given_up(items: Sequence[WorkItem]) -> None:
    """Answer requests whose computation was abandoned (nobody reads it: for the record)."""
    logger.info("stopped a batch of %d request(s): all of them were given up", len(items))
    for item in items:
        item.future.set_exception(
            DeadlineExceeded(
                "The request was given up (client gone or deadline passed) while it was computed."
            )
        )


def _fail(items: Sequence[WorkItem], error: Exception) -> None:
    for item in items:
        if item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)
