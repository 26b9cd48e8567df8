"""MicroBatcher: requests from many threads, one model step at a time, in batches.

One consumer thread per worker process. When the model is free it takes what is
queued, up to ``max_batch_size`` images: an idle server adds no wait to a lone
request, a busy one batches whatever arrived meanwhile. ``max_batch_delay_s``
(default 0) can add a wait, counted from the first queued item on a monotonic
clock. Items for different keys (model, layer) go to different batches;
different methods and targets share one (the method is post-processing).

A full queue refuses at once (``Overloaded``, 503); an item past its deadline is
dropped before compute (``DeadlineExceeded``, 504); a cancelled item (its
client went away) is skipped. If a batch raises, it is retried item by item, so
one poisoned image cannot fail its neighbours. ``close()`` fails what is queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.engine.gradcam import CamBatch
from service.errors import ClientClosed, DeadlineExceeded, Overloaded

logger = logging.getLogger(__name__)

# Items batch together only under the same key: (model name, layer).
BatchKey = tuple[str, str]
# (key, inputs (N, C, H, W), targets per image, method per image) → CamBatch for those N.
ComputeFn = Callable[[BatchKey, torch.Tensor, list[list[int | None]], list[str]], CamBatch]


@dataclass
class WorkItem:
    """One request's images for one key; ``future`` receives its ``CamBatch``."""

    key: BatchKey
    inputs: torch.Tensor  # (n, C, H, W)
    targets: list[list[int | None]]
    methods: list[str]
    deadline: float  # time.monotonic() after which the result is useless
    future: Future[CamBatch] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch looked like, for metrics."""

    images: int
    items: int
    queue_waits_s: tuple[float, ...]
    compute_s: float


class MicroBatcher:
    def __init__(self, compute: ComputeFn, *, max_batch_size: int = 16,
                 max_batch_delay_s: float = 0.0, max_queue: int = 256,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_batch_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, the delay >= 0")
        self._compute = compute
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._pending: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gradcam-batcher", daemon=True)
        self._thread.start()

    # --- request threads -------------------------------------------------------

    def submit(self, item: WorkItem) -> Future[CamBatch]:
        """Queue ``item``; ``Overloaded`` at once if the queue is full or closing."""
        with self._cond:
            if self._closed:
                raise Overloaded("The server is shutting down; retry on another replica.")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"The queue is full ({self.max_queue} requests waiting); "
                                 "retry shortly.", retry_after_s=1)
            self._pending.append(item)
            self._report_depth()
            self._cond.notify()
        return item.future

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking work, fail what is queued, and wait for the running batch."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._report_depth()
            self._cond.notify_all()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(
                    Overloaded("The server is shutting down; retry on another replica."))
        self._thread.join(timeout_s)

    # --- the consumer thread ---------------------------------------------------

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._pending))

    def _take_batch(self) -> list[WorkItem] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending[0]
            if self.max_batch_delay_s > 0:
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
                    item.future.set_exception(DeadlineExceeded(
                        "The request waited past its deadline before it could be computed; "
                        "the server is overloaded."))
                    continue
                live.append(item)
            if live:
                self._execute(live, now)

    def _execute(self, items: Sequence[WorkItem], started_wait: float) -> None:
        started = time.monotonic()
        try:
            result = self._call(items)
        except Exception as error:  # delivered to the requests, never lost
            if len(items) == 1:
                items[0].future.set_exception(error)
                return
            logger.warning("a batch of %d requests failed (%s); retrying them one by one",
                           len(items), error)
            for item in items:
                try:
                    item.future.set_result(self._call([item]))
                except Exception as single:
                    item.future.set_exception(single)
            return
        compute_s = time.monotonic() - started
        offset = 0
        for item in items:
            n = item.size
            item.future.set_result(CamBatch(
                logits=result.logits[offset:offset + n],
                targets=result.targets[offset:offset + n],
                cams=result.cams[offset:offset + n]))
            offset += n
        if self._on_batch is not None:
            self._on_batch(BatchStats(
                images=offset, items=len(items),
                queue_waits_s=tuple(started_wait - i.enqueued_at for i in items),
                compute_s=compute_s))

    def _call(self, items: Sequence[WorkItem]) -> CamBatch:
        inputs = items[0].inputs if len(items) == 1 else torch.cat([i.inputs for i in items])
        targets = [t for i in items for t in i.targets]
        methods = [m for i in items for m in i.methods]
        return self._compute(items[0].key, inputs, targets, methods)


def wait(future: Future[CamBatch], deadline: float,
         disconnected: Callable[[], bool] | None = None, poll_s: float = 0.05) -> CamBatch:
    """Wait for ``future`` until ``deadline`` (monotonic), cancelling it if the client left."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            future.cancel()
            raise DeadlineExceeded("The request took longer than its deadline.")
        try:
            return future.result(timeout=min(poll_s, remaining))
        except TimeoutError:
            if disconnected is not None and disconnected():
                future.cancel()
                raise ClientClosed("The client disconnected before the result was ready.") from None
