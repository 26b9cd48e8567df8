"""MicroBatcher: jobs from many requests, one model step at a time, in batches.

One consumer thread (the model loop) per engine. When the model is free it takes what is
queued, up to ``max_batch_size`` images: an idle server adds no wait to a lone
request, a busy one batches whatever arrived meanwhile. ``max_batch_delay_s``
(default 0) can add a wait, counted from the first queued item on a monotonic
clock. Items for different keys (model, layer) go to different batches;
different methods and targets share one (the method is post-processing).

A request whose work goes on after its batch (faithfulness curves: 39 forward passes
per explanation) gets that work done in rounds (``follow_up``: one explanation each),
and the model loop takes turns: a batch of what is queued, then one round of the next
continuing request, then a batch again, the continuing requests round-robin. So a
light request waits for at most one round, not for a heavy request's whole work, and
heavy requests share the rounds among themselves.

A full queue refuses at once (``Overloaded``, 503): full means ``max_queue``
requests waiting, or more work ahead of the new request than the model gets through
in ``max_queue_wait_s`` at its measured pace: what is left of the step running now,
the batches queued, a round beside each of them while requests continue, and, for a
request with rounds of its own, the rounds of those already continuing (which its
rounds share the model with). So an overloaded service answers 503 in milliseconds
instead of letting every request wait towards its deadline. An idle engine always
takes a request. An item past its deadline is dropped before
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
from dataclasses import dataclass
from functools import partial

from service.contract.errors import DeadlineExceeded, EngineUnavailable, Overloaded
from service.engine.pace import Pace
from service.engine.work_items import (
    Abandoned,
    BatchKey,
    BatchStats,
    Continuing,
    FollowUp,
    WorkItem,
    merge_jobs,
)
from service.logs import log_failure, where
from service.transport.interface import Job, JobResult, JobTimings

logger = logging.getLogger(__name__)

# A job (one or several requests merged, in order) and a "should I stop?" question it
# asks between its expensive steps → its result, all on the CPU.
ComputeFn = Callable[[Job, Callable[[], bool]], JobResult]
# One request's job and its batch's result → its follow-up rounds, or None: it is done.
FollowUpFn = Callable[[Job, JobResult], FollowUp | None]


@dataclass(frozen=True)
class QueueLimits:
    """How much the batcher takes (module text): up to ``max_batch_size`` images a batch,
    the first queued item waiting up to ``max_batch_delay_s`` for company, and a queue
    that refuses a request beyond ``max_queue`` waiting or ``max_queue_wait_s`` of work
    ahead (0: no such limit)."""

    max_batch_size: int = 16
    max_batch_delay_s: float = 0.0
    max_queue: int = 256
    max_queue_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_queue < 1
            or self.max_batch_delay_s < 0
            or self.max_queue_wait_s < 0
        ):
            raise ValueError("max_batch_size and max_queue must be >= 1, the waits >= 0")


@dataclass(frozen=True)
class BatcherCallbacks:
    """What the model loop reports, each called on its thread if given: a batch done
    (``on_batch``), the queue's new depth (``on_queue_depth``), seconds it waited with
    nothing queued (``on_idle``: engine idle time), and its own death (``on_fatal``)."""

    on_batch: Callable[[BatchStats], None] | None = None
    on_queue_depth: Callable[[int], None] | None = None
    on_idle: Callable[[float], None] | None = None
    on_fatal: Callable[[BaseException], None] | None = None


class MicroBatcher:
    def __init__(
        self,
        compute: ComputeFn,
        *,
        follow_up: FollowUpFn | None = None,
        limits: QueueLimits = QueueLimits(),
        callbacks: BatcherCallbacks = BatcherCallbacks(),
    ) -> None:
        self._compute = compute
        self._follow_up = follow_up
        self.limits = limits
        self._callbacks = callbacks
        self._pending: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._drain = False
        self._dead = False
        self._pace = Pace()
        self._running: list[WorkItem] = []
        self._continuing: deque[Continuing] = deque()
        self._batch_turn = True  # the next step is a batch, if one is queued
        # The step running now: when it started, what it costs in images, the
        # continuing request whose round it is (None: a batch), and its model.
        self._step: tuple[float, float, Continuing | None, str] | None = None
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
            if self._pending or self._continuing or self._step is not None:
                limits = self.limits
                if len(self._pending) >= limits.max_queue:
                    raise Overloaded(
                        f"The queue is full ({limits.max_queue} requests waiting); retry shortly.",
                        retry_after_s=1,
                    )
                wait_s = self._expected_wait_s(item)
                if wait_s is not None and wait_s > limits.max_queue_wait_s:
                    raise Overloaded(
                        f"The model is {wait_s:.1f} s behind (limit {limits.max_queue_wait_s:g} s);"
                        " retry shortly.",
                        retry_after_s=max(1, round(wait_s)),
                    )
            self._pending.append(item)
            self._report_depth()
            self._cond.notify()
        return item.future

    def _expected_wait_s(self, item: WorkItem) -> float | None:
        """The work ahead of ``item`` at each model's recent pace (module text), in
        seconds."""
        if not self.limits.max_queue_wait_s or not self._pace.known:
            return None
        pace = self._pace.of
        running, batch_next = 0.0, self._batch_turn
        # Rounds still to run: (their work, one round's, in seconds).
        rounds = [
            (c.remaining_work * pace(c.item.job.model), c.item.round_work * pace(c.item.job.model))
            for c in self._continuing
        ]
        if self._step is not None:
            started, work, continuing, model = self._step
            running = max(0.0, work * pace(model) - (time.monotonic() - started))
            batch_next = continuing is not None
            if continuing is not None:
                left = continuing.remaining_work - work
                rounds.append((left * pace(model), continuing.item.round_work * pace(model)))
        rounds += [
            ((w.work - w.size) * pace(w.job.model), w.round_work * pace(w.job.model))
            for w in self._pending
            if w.work > w.size
        ]
        later = sum(left for left, _ in rounds)
        queued = sum(waiting.size for waiting in self._pending)
        ahead = sum(waiting.size * pace(waiting.job.model) for waiting in self._pending)
        if later > 0:
            # A batch and a round take turns: a round runs after each batch ahead.
            between = -(-queued // self.limits.max_batch_size) + (0 if batch_next else 1)
            each = max(size for _, size in rounds)
            ahead += min(later, between * each)
            if item.work > item.size:
                ahead += later  # its own rounds share the model with all of these
        return running + ahead

    def close(self, timeout_s: float = 10.0, drain: bool = False) -> None:
        """Stop taking work; fail what is queued (or, with ``drain``, compute it first);
        wait for the model loop to finish."""
        with self._cond:
            self._closed = True
            self._drain = drain
            pending = [] if drain else list(self._pending)
            continuing = [] if drain else list(self._continuing)
            if not drain:
                self._pending.clear()
                self._continuing.clear()
            self._report_depth()
            self._cond.notify_all()
        shutting_down = Overloaded("The server is shutting down; retry on another replica.")
        _fail(pending, shutting_down)
        _stop(continuing, shutting_down)
        self._thread.join(timeout_s)

    # --- the model loop --------------------------------------------------------

    def _report_depth(self) -> None:
        if self._callbacks.on_queue_depth is not None:
            self._callbacks.on_queue_depth(len(self._pending))

    def _next_step(self) -> list[WorkItem] | Continuing | None:
        """What the model loop does next: a batch of what is queued, or one round of a
        continuing request, taking turns while there are both; None: closed."""
        with self._cond:
            idle_from = time.monotonic() if not self._pending and not self._continuing else None
            while not self._pending and not self._continuing and not self._closed:
                self._cond.wait()
            if idle_from is not None and self._callbacks.on_idle is not None:
                self._callbacks.on_idle(time.monotonic() - idle_from)
            if (self._closed and not self._drain) or not (self._pending or self._continuing):
                return None
            if self._pending and (self._batch_turn or not self._continuing):
                self._batch_turn = False
                batch = self._take_batch()
                work = sum(i.size if self._follow_up else i.work for i in batch)
                self._step = (time.monotonic(), float(work), None, batch[0].job.model)
                return batch
            self._batch_turn = True
            continuing = self._continuing.popleft()
            work = min(continuing.item.round_work, continuing.remaining_work)
            self._step = (
                time.monotonic(),
                work or continuing.remaining_work,
                continuing,
                continuing.item.job.model,
            )
            return continuing

    def _take_batch(self) -> list[WorkItem]:
        """The queued items that batch with the first one, up to ``max_batch_size``
        images (called with the lock held and something queued)."""
        first = self._pending[0]
        if self.limits.max_batch_delay_s > 0 and not self._closed and not self._continuing:
            until = first.enqueued_at + self.limits.max_batch_delay_s
            while not self._closed and self._queued_images(first.key) < self.limits.max_batch_size:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        batch: list[WorkItem] = []
        images = 0
        for item in list(self._pending):
            if item.key != first.key:
                continue
            if batch and images + item.size > self.limits.max_batch_size:
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
            step = self._next_step()
            if step is None:
                self._fail_leftovers()
                return
            if isinstance(step, Continuing):
                self._running = [step.item]
                self._round(step)
            else:
                self._batch(step)
            self._running = []
            self._step = None

    def _batch(self, batch: list[WorkItem]) -> None:
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

    def _fail_leftovers(self) -> None:
        """Closed without draining: what the last step put back is failed too."""
        with self._cond:
            pending, continuing = list(self._pending), list(self._continuing)
            self._pending.clear()
            self._continuing.clear()
        shutting_down = Overloaded("The server is shutting down; retry on another replica.")
        _fail(pending, shutting_down)
        _stop(continuing, shutting_down)

    def _round(self, continuing: Continuing) -> None:
        """One round of a continuing request; it goes to the back of the line, or is
        answered when its last round is done."""
        item = continuing.item
        started = time.monotonic()
        if item.given_up(started):
            _stop([continuing], _given_up())
            return
        try:
            work = next(continuing.rounds)
        except StopIteration as done:
            continuing.compute_s += time.monotonic() - started
            self._pace.learn(item.job.model, time.monotonic() - started, continuing.remaining_work)
            timings = JobTimings(
                queue_wait_s=continuing.queue_wait_s,
                compute_s=continuing.compute_s,
                batch_images=continuing.batch_images,
            )
            item.future.set_result(done.value.slice(0, item.size, timings))
            return
        except Abandoned:
            _fail_given_up([item])
            return
        except Exception as error:  # this request's alone: the others go on
            log_failure(logger, "a follow-up round failed", error, logging.WARNING)
            item.future.set_exception(error)
            return
        took = time.monotonic() - started
        continuing.compute_s += took
        continuing.remaining_work = max(0.0, continuing.remaining_work - work)
        self._pace.learn(item.job.model, took, work)
        with self._cond:
            self._continuing.append(continuing)

    def _die(self, error: BaseException) -> None:
        log_failure(logger, "the model loop died", error, logging.CRITICAL)
        with self._cond:
            self._dead = True
            pending = list(self._pending)
            continuing = list(self._continuing)
            self._pending.clear()
            self._continuing.clear()
            self._report_depth()
        failure = EngineUnavailable("The engine failed and is restarting; retry shortly.")
        for item in self._running:
            if not item.future.done():
                item.future.set_exception(failure)
        _fail(pending, failure)
        _stop(continuing, failure)
        if self._callbacks.on_fatal is not None:
            self._callbacks.on_fatal(error)

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
                one_started = time.monotonic()
                try:
                    single_result = self._compute(item.job, partial(_all_given_up, [item]))
                except Abandoned:
                    _fail_given_up([item])
                    continue
                except Exception as single:
                    item.future.set_exception(single)
                    continue
                timings = JobTimings(
                    queue_wait_s=started_wait - item.enqueued_at,
                    compute_s=time.monotonic() - one_started,
                    batch_images=item.size,
                )
                self._done_or_continue(item, single_result.slice(0, item.size, timings))
            return
        compute_s = time.monotonic() - started
        images = sum(item.size for item in items)
        # Per plain explanation: a batch with faithfulness curves is not a slow engine.
        self._pace.learn(
            items[0].job.model,
            compute_s,
            sum(item.size if self._follow_up else item.work for item in items),
        )
        offset = 0
        for item in items:
            timings = JobTimings(
                queue_wait_s=started_wait - item.enqueued_at,
                compute_s=compute_s,
                batch_images=images,
            )
            self._done_or_continue(item, result.slice(offset, offset + item.size, timings))
            offset += item.size
        if self._callbacks.on_batch is not None:
            self._callbacks.on_batch(
                BatchStats(
                    images=images,
                    items=len(items),
                    queue_waits_s=tuple(started_wait - i.enqueued_at for i in items),
                    compute_s=compute_s,
                )
            )

    def _done_or_continue(self, item: WorkItem, result: JobResult) -> None:
        """Answer ``item`` with its batch's ``result``, or line it up for its rounds."""
        rounds = self._follow_up(item.job, result) if self._follow_up is not None else None
        if rounds is None:
            item.future.set_result(result)
            return
        continuing = Continuing(
            item=item,
            rounds=rounds,
            remaining_work=item.work - item.size,
            queue_wait_s=result.timings.queue_wait_s,
            compute_s=result.timings.compute_s,
            batch_images=result.timings.batch_images,
        )
        with self._cond:
            self._continuing.append(continuing)


def _given_up() -> DeadlineExceeded:
    return DeadlineExceeded(
        "The request was given up (client gone or deadline passed) while it was computed."
    )


def _stop(continuing: Sequence[Continuing], error: Exception) -> None:
    """Fail continuing requests with ``error`` and drop their rounds."""
    for entry in continuing:
        entry.rounds.close()
        if not entry.item.future.done():
            entry.item.future.set_exception(error)


def _all_given_up(items: Sequence[WorkItem]) -> bool:
    now = time.monotonic()
    return all(item.given_up(now) for item in items)


def _fail_given_up(items: Sequence[WorkItem]) -> None:
    """Answer requests whose computation was abandoned (nobody reads it: for the record)."""
    logger.info("stopped a batch of %d request(s): all of them were given up", len(items))
    for item in items:
        item.future.set_exception(_given_up())


def _fail(items: Sequence[WorkItem], error: Exception) -> None:
    for item in items:
        if item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)
