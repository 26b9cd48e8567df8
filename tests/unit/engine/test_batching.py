"""MicroBatcher rules, with a fake engine whose timing the test controls.

No test waits a fixed time for another thread to get somewhere: each waits for the
state itself (``FakeEngine.busy``, ``wait_until``), so a busy machine cannot
make them flake. Sleeps remain only where time itself must pass (a deadline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from service.contract.errors import DeadlineExceeded, EngineUnavailable, Overloaded
from service.engine.batching import BatcherCallbacks, MicroBatcher, QueueLimits
from service.engine.work_items import BatchKey, BatchStats, FollowUp, WorkItem
from service.transport.interface import Job, JobResult, wait_for
from tests.helpers import wait_until

KEY: BatchKey = ("m", "layer")


class FakeEngine:
    """Records each call's batch; a value of -1 in an image poisons its batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[BatchKey, int]] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.stop_answers: list[bool] = []  # what should_stop() said after the gate

    def busy(self) -> None:
        """Wait until the model loop has taken a batch (and, gate closed, holds it)."""
        assert self.entered.wait(10), "the model loop never took a batch"

    def __call__(self, job: Job, should_stop: Callable[[], bool] | None = None) -> JobResult:
        self.entered.set()
        self.gate.wait(10)
        if should_stop is not None:
            self.stop_answers.append(should_stop())
        self.calls.append(((job.model, job.layer), job.size))
        time.sleep(self.delay_s)  # the batch's compute time: time itself passes
        if any((image == -1).any() for image in job.images):
            raise ValueError("poisoned input")
        # Each image's "map" is its own pixels: results must come back to their owner.
        scores = np.stack([image.reshape(-1)[:2] for image in job.images])
        return JobResult(
            scores=scores,
            logits=scores,
            targets=[[0 if t is None else t for t in ts] for ts in job.targets],
            maps=[[image[:, :, 0].copy()] for image in job.images],
        )


def _item(value: float, n: int = 1, key: BatchKey = KEY, timeout_s: float = 10) -> WorkItem:
    job = Job(
        model=key[0],
        layer=key[1],
        images=[np.full((2, 2, 1), value, dtype=np.float32) for _ in range(n)],
        boxes=[None] * n,
        targets=[[None]] * n,
        methods=["gradcam"] * n,
    )
    return WorkItem(job=job, deadline=time.monotonic() + timeout_s)


def test_an_idle_batcher_adds_no_wait() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=8))
    started = time.monotonic()
    result = batcher.submit(_item(3.0))
    out = result.result(5)
    assert time.monotonic() - started < 0.1
    assert float(out.maps[0][0][0, 0]) == 3.0
    batcher.close()


def test_a_busy_batcher_batches_what_arrived_meanwhile_and_results_find_their_owner() -> None:
    engine = FakeEngine()
    engine.gate.clear()  # hold the model busy
    stats: list[BatchStats] = []
    batcher = MicroBatcher(
        engine,
        limits=QueueLimits(max_batch_size=8),
        callbacks=BatcherCallbacks(on_batch=stats.append),
    )
    first = batcher.submit(_item(0.0))
    engine.busy()  # the consumer has taken the first item and waits at the gate
    futures = [batcher.submit(_item(float(v))) for v in range(1, 11)]
    engine.gate.set()
    assert float(first.result(5).maps[0][0][0, 0]) == 0.0
    for value, future in zip(range(1, 11), futures, strict=True):
        assert float(future.result(5).maps[0][0][0, 0]) == value
    # 1 alone, then a full batch of 8, then the remaining 2.
    assert [n for _, n in engine.calls] == [1, 8, 2]
    assert stats[1].images == 8 and stats[1].items == 8
    batcher.close()


def test_delay_waits_for_a_fuller_batch_from_the_first_item() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=4, max_batch_delay_s=5.0))
    started = time.monotonic()
    futures = [batcher.submit(_item(1.0))]
    futures += [batcher.submit(_item(2.0)) for _ in range(3)]  # fills the batch early
    for future in futures:
        future.result(10)
    assert [n for _, n in engine.calls] == [4]
    assert time.monotonic() - started < 2.5  # a full batch does not wait out the delay
    batcher.close()


def test_different_keys_go_to_different_batches() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=8))
    batcher.submit(_item(0.0))
    engine.busy()
    futures = [
        batcher.submit(_item(1.0, key=("m", "a"))),
        batcher.submit(_item(2.0, key=("m", "b"))),
        batcher.submit(_item(3.0, key=("m", "a"))),
    ]
    engine.gate.set()
    for future in futures:
        future.result(5)
    assert engine.calls[1:] == [(("m", "a"), 2), (("m", "b"), 1)]
    batcher.close()


def test_a_full_queue_answers_overloaded_at_once() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=1, max_queue=2))
    batcher.submit(_item(0.0))
    engine.busy()
    batcher.submit(_item(1.0))
    batcher.submit(_item(2.0))
    with pytest.raises(Overloaded) as info:
        batcher.submit(_item(3.0))
    assert info.value.status == 503 and info.value.retry_after_s >= 1
    engine.gate.set()
    batcher.close()


def test_a_request_past_its_deadline_is_dropped_before_compute() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=1))
    batcher.submit(_item(0.0))
    engine.busy()
    late = batcher.submit(_item(1.0, timeout_s=0.05))
    time.sleep(0.1)  # its deadline passes while it waits: time itself must pass
    engine.gate.set()
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert len(engine.calls) == 1  # the late one never reached the engine
    batcher.close()


def test_wait_gives_504_and_cancels_a_disconnected_request() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=1))
    batcher.submit(_item(0.0))
    engine.busy()
    item = _item(1.0)
    future = batcher.submit(item)
    with pytest.raises(DeadlineExceeded):
        wait_for(future, time.monotonic() + 0.1)
    gone = batcher.submit(_item(2.0))
    with pytest.raises(Exception, match="disconnected"):
        wait_for(gone, time.monotonic() + 5, disconnected=lambda: True)
    assert future.cancelled() and gone.cancelled()
    engine.gate.set()
    batcher.submit(_item(3.0)).result(5)  # behind the cancelled ones
    assert [n for _, n in engine.calls] == [1, 1]  # cancelled items are skipped
    batcher.close()


def test_a_failing_batch_is_retried_item_by_item() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=8))
    batcher.submit(_item(0.0))
    engine.busy()
    good = [batcher.submit(_item(float(v))) for v in (1, 2)]
    bad = batcher.submit(_item(-1.0))
    engine.gate.set()
    assert [float(f.result(5).maps[0][0][0, 0]) for f in good] == [1.0, 2.0]
    with pytest.raises(ValueError, match="poisoned"):
        bad.result(5)
    # The batch of 3 failed once, then each item ran alone.
    assert [n for _, n in engine.calls] == [1, 3, 1, 1, 1]
    batcher.close()


def test_close_fails_pending_requests() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=1))
    running = batcher.submit(_item(0.0))
    engine.busy()
    pending = [batcher.submit(_item(1.0)) for _ in range(3)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    wait_until(lambda: not batcher.alive, 10, "close() to begin")
    engine.gate.set()
    closer.join(5)
    running.result(5)
    for future in pending:
        with pytest.raises(Overloaded, match="shutting down"):
            future.result(5)
    with pytest.raises(Overloaded):
        batcher.submit(_item(2.0))


def test_many_threads_each_get_their_own_result() -> None:
    engine = FakeEngine(delay_s=0.01)
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=8))

    def one(value: int) -> float:
        return float(batcher.submit(_item(float(value), n=2)).result(10).maps[1][0][0, 0])

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(64))) == [float(v) for v in range(64)]
    assert max(n for _, n in engine.calls) > 2  # requests were batched together
    assert all(n <= 8 for _, n in engine.calls)
    batcher.close()


def test_a_full_queue_by_time_answers_overloaded_at_once() -> None:
    """The work ahead counts the step running now: one running and two queued at
    0.1 s each is past 0.25 s (the queued ones alone, 0.2 s, would not be)."""
    engine = FakeEngine(delay_s=0.1)
    batcher = MicroBatcher(
        engine, limits=QueueLimits(max_batch_size=1, max_queue=100, max_queue_wait_s=0.25)
    )
    batcher.submit(_item(0.0)).result(5)  # measures the pace: ~0.1 s per image
    engine.gate.clear()
    engine.entered.clear()
    running = batcher.submit(_item(0.0))
    engine.busy()
    queued = [batcher.submit(_item(1.0)) for _ in range(2)]
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        batcher.submit(_item(2.0))
    assert time.monotonic() - started < 0.05
    assert "behind" in info.value.message and info.value.retry_after_s >= 1
    engine.gate.set()
    for future in [running, *queued]:
        future.result(5)
    batcher.submit(_item(3.0)).result(5)  # drained: taken again
    batcher.close()


def test_faithfulness_is_weighed_in_the_pace_not_taken_for_a_slow_engine() -> None:
    """A job with faithfulness curves counts as 13 images more per explanation
    (``Job.work``): one that takes 0.05 s sets a pace of 0.05 / 14 s per image, so six
    plain requests queued after it are far from the 0.2 s limit (at 0.05 s per image
    they would be over it)."""
    plain = _item(0.0).job
    curves = Job(**{**plain.__dict__, "faithfulness": [True]})
    two_targets = Job(**{**curves.__dict__, "targets": [[0, 1]]})
    assert (plain.work, curves.work, two_targets.work) == (1, 14, 27)
    engine = FakeEngine(delay_s=0.05)
    batcher = MicroBatcher(
        engine, limits=QueueLimits(max_batch_size=1, max_queue=100, max_queue_wait_s=0.2)
    )
    batcher.submit(WorkItem(job=curves, deadline=time.monotonic() + 10)).result(5)
    engine.gate.clear()
    engine.entered.clear()
    running = batcher.submit(_item(0.0))
    engine.busy()
    queued = [batcher.submit(_item(1.0)) for _ in range(6)]  # no Overloaded
    engine.gate.set()
    for future in [running, *queued]:
        future.result(5)
    batcher.close()


def test_close_with_drain_computes_what_is_queued() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=1))
    running = batcher.submit(_item(0.0))
    engine.busy()
    queued = [batcher.submit(_item(float(v))) for v in (1, 2)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": True})
    closer.start()
    wait_until(lambda: not batcher.alive, 10, "close() to begin")
    with pytest.raises(Overloaded):
        batcher.submit(_item(3.0))  # closing: nothing new
    engine.gate.set()
    closer.join(5)
    assert [float(f.result(5).maps[0][0][0, 0]) for f in [running, *queued]] == [0.0, 1.0, 2.0]


def test_a_dead_model_loop_fails_its_queue_and_reports() -> None:
    died: list[BaseException] = []

    def broken_compute(job: Job, should_stop: Callable[[], bool]) -> JobResult:
        raise SystemExit("a bug outside the model call")  # not an Exception: not retried

    batcher = MicroBatcher(
        broken_compute,
        limits=QueueLimits(max_batch_size=1),
        callbacks=BatcherCallbacks(on_fatal=died.append),
    )
    future = batcher.submit(_item(0.0))
    with pytest.raises(EngineUnavailable):
        future.result(5)
    wait_until(lambda: not batcher.alive and len(died) == 1, 10, "the loop to report its death")
    with pytest.raises(Overloaded):
        batcher.submit(_item(1.0))


def test_a_running_item_cancelled_is_abandoned_and_its_batch_told_to_stop() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = MicroBatcher(engine, limits=QueueLimits(max_batch_size=1))
    running = batcher.submit(_item(0.0))
    engine.busy()
    assert running.cancel() is False  # a running future cannot be cancelled…
    engine.gate.set()
    wait_until(lambda: len(engine.stop_answers) == 1, 10, "the first batch to ask")
    assert engine.stop_answers == [True]  # …but its batch hears that nobody waits for it
    kept = batcher.submit(_item(1.0))
    assert float(kept.result(5).maps[0][0][0, 0]) == 1.0
    assert engine.stop_answers == [True, False]
    batcher.close()


# --- follow-up rounds: heavy requests share the model with light ones ------------------


class FakeRounds:
    """Follow-up rounds for jobs with faithfulness: ``rounds`` per request, each logged
    as (the request's first pixel, round number) and each held at ``gate`` while it is
    closed; a pixel of -2 makes round 1 fail. ``log`` may be shared with an engine's
    batches (``LoggingEngine``), to see the order of the model loop's steps."""

    def __init__(self, rounds: int = 3, work: float = 13.0) -> None:
        self.rounds = rounds
        self.work = work
        self.log: list[tuple[float, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a round has started (and waits if gated)
        self.closed: list[float] = []

    def __call__(self, job: Job, result: JobResult) -> FollowUp | None:
        if not any(job.faithfulness):
            return None
        return self._rounds(float(job.images[0].reshape(-1)[0]), result)

    def _rounds(self, name: float, result: JobResult) -> FollowUp:
        try:
            for number in range(self.rounds):
                if number:
                    yield self.work
                self.entered.set()
                assert self.gate.wait(10)
                if name == -2 and number == 1:
                    raise ValueError("a round failed")
                self.log.append((name, number))
            return replace(result, curves=[[np.full((2, 21), name, np.float32)]])
        finally:
            if len([n for n, _ in self.log if n == name]) < self.rounds:
                self.closed.append(name)


class LoggingEngine(FakeEngine):
    """A ``FakeEngine`` that logs each batch as ("batch", its first pixel) in ``log``."""

    def __init__(self, log: list[Any]) -> None:
        super().__init__()
        self.log = log

    def __call__(self, job: Job, should_stop: Callable[[], bool] | None = None) -> JobResult:
        result = super().__call__(job, should_stop)
        self.log.append(("batch", float(job.images[0].reshape(-1)[0])))
        return result


def _heavy(value: float, rounds: int = 3, timeout_s: float = 10) -> WorkItem:
    """A request of one image with faithfulness curves for ``rounds`` classes."""
    item = _item(value, timeout_s=timeout_s)
    job = replace(item.job, targets=[list(range(rounds))], faithfulness=[True])
    return WorkItem(job=job, deadline=item.deadline)


def test_a_light_request_runs_between_a_heavy_requests_rounds() -> None:
    rounds = FakeRounds(rounds=4)
    engine = LoggingEngine(rounds.log)
    batcher = MicroBatcher(engine, follow_up=rounds, limits=QueueLimits(max_batch_size=8))
    rounds.gate.clear()
    heavy = batcher.submit(_heavy(7.0, rounds=4))
    assert rounds.entered.wait(10)  # its first round has begun
    light = batcher.submit(_item(1.0))
    rounds.gate.set()
    assert float(light.result(5).maps[0][0][0, 0]) == 1.0
    done = heavy.result(5)
    assert float(done.curves[0][0][0, 0]) == 7.0 and float(done.maps[0][0][0, 0]) == 7.0
    # The light one went in after the heavy one's first round, not after its last.
    assert rounds.log == [
        ("batch", 7.0),
        (7.0, 0),
        ("batch", 1.0),
        (7.0, 1),
        (7.0, 2),
        (7.0, 3),
    ]
    batcher.close()


def test_heavy_requests_take_their_rounds_in_turn() -> None:
    rounds = FakeRounds(rounds=3)
    engine = LoggingEngine(rounds.log)
    engine.gate.clear()
    batcher = MicroBatcher(engine, follow_up=rounds, limits=QueueLimits(max_batch_size=1))
    first = batcher.submit(_heavy(1.0))
    engine.busy()
    second = batcher.submit(_heavy(2.0))
    engine.gate.set()
    first.result(5)
    second.result(5)
    # A batch and a round take turns; the continuing requests' rounds go round-robin.
    assert rounds.log == [
        ("batch", 1.0),
        (1.0, 0),
        ("batch", 2.0),
        (1.0, 1),
        (2.0, 0),
        (1.0, 2),
        (2.0, 1),
        (2.0, 2),
    ]
    batcher.close()


def test_admission_counts_the_rounds_still_to_come() -> None:
    """At 0.01 s per image, a continuing request's rounds (3 × 13 images) are ~0.4 s of
    work: a second heavy request, whose rounds would share the model with them, is over
    a 0.2 s limit; a light one waits for one round only and is taken."""
    engine, rounds = FakeEngine(delay_s=0.01), FakeRounds(rounds=3, work=13.0)
    batcher = MicroBatcher(
        engine,
        follow_up=rounds,
        limits=QueueLimits(max_batch_size=1, max_queue=100, max_queue_wait_s=0.2),
    )
    batcher.submit(_item(0.0)).result(5)  # the pace: ~0.01 s per image
    rounds.gate.clear()
    heavy = batcher.submit(_heavy(1.0))
    assert rounds.entered.wait(10)  # its first round runs (and waits at the gate)
    with pytest.raises(Overloaded, match="behind"):
        batcher.submit(_heavy(2.0))
    light = batcher.submit(_item(3.0))
    rounds.gate.set()
    light.result(5)
    heavy.result(5)
    batcher.close()


def test_a_request_given_up_between_rounds_stops_and_the_others_go_on() -> None:
    engine, rounds = FakeEngine(), FakeRounds(rounds=3)
    batcher = MicroBatcher(engine, follow_up=rounds, limits=QueueLimits(max_batch_size=1))
    rounds.gate.clear()
    leaving = batcher.submit(_heavy(1.0))
    wait_until(lambda: engine.calls, 10, "the first batch")
    staying = batcher.submit(_heavy(2.0))
    leaving.cancel()  # running: marked abandoned, stopped before its next round
    rounds.gate.set()
    with pytest.raises(DeadlineExceeded, match="given up"):
        leaving.result(5)
    assert float(staying.result(5).curves[0][0][0, 0]) == 2.0
    assert rounds.closed == [1.0] and (1.0, 2) not in rounds.log
    batcher.close()


def test_a_failing_round_fails_its_request_only() -> None:
    engine, rounds = FakeEngine(), FakeRounds(rounds=3)
    batcher = MicroBatcher(engine, follow_up=rounds, limits=QueueLimits(max_batch_size=1))
    failing = batcher.submit(_heavy(-2.0))
    fine = batcher.submit(_heavy(2.0))
    with pytest.raises(ValueError, match="a round failed"):
        failing.result(5)
    assert float(fine.result(5).curves[0][0][0, 0]) == 2.0
    assert batcher.alive
    batcher.close()


@pytest.mark.parametrize("drain", [False, True])
def test_close_fails_or_finishes_the_continuing_requests(drain: bool) -> None:
    engine, rounds = FakeEngine(), FakeRounds(rounds=3)
    batcher = MicroBatcher(engine, follow_up=rounds, limits=QueueLimits(max_batch_size=1))
    rounds.gate.clear()
    heavy = batcher.submit(_heavy(1.0))
    wait_until(lambda: engine.calls, 10, "its batch")
    closer = threading.Thread(target=batcher.close, kwargs={"drain": drain})
    closer.start()
    wait_until(lambda: not batcher.alive, 10, "close() to begin")
    rounds.gate.set()
    closer.join(5)
    if drain:
        assert float(heavy.result(5).curves[0][0][0, 0]) == 1.0
    else:
        with pytest.raises(Overloaded, match="shutting down"):
            heavy.result(5)


class TwoModels(FakeEngine):
    """A slow model ("volumes": 0.1 s per image) and a fast one ("images": none)."""

    def __call__(self, job: Job, should_stop: Callable[[], bool] | None = None) -> JobResult:
        self.delay_s = 0.1 * job.size if job.model == "volumes" else 0.0
        return super().__call__(job, should_stop)


def test_each_model_is_admitted_at_its_own_pace() -> None:
    """After a volume model's 0.1 s batch, radiographs queued behind a radiograph are
    admitted (one pace for both, smoothed, read 0.08 s per image: five of them over
    the 0.05 s limit), while a second volume queued behind one is over it."""
    engine = TwoModels()
    batcher = MicroBatcher(
        engine, limits=QueueLimits(max_batch_size=1, max_queue=100, max_queue_wait_s=0.05)
    )
    volumes, images = ("volumes", "layer"), ("images", "layer")
    batcher.submit(_item(0.0, key=volumes)).result(5)
    batcher.submit(_item(0.0, key=images)).result(5)
    engine.gate.clear()
    engine.entered.clear()
    running = batcher.submit(_item(0.0, key=images))
    engine.busy()
    queued = [batcher.submit(_item(1.0, key=images)) for _ in range(5)]  # no Overloaded
    queued.append(batcher.submit(_item(2.0, key=volumes)))  # only radiographs ahead
    with pytest.raises(Overloaded, match="behind"):
        batcher.submit(_item(3.0, key=volumes))  # a volume's 0.1 s ahead
    engine.gate.set()
    for future in [running, *queued]:
        future.result(5)
    batcher.close()
