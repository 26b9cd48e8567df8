"""What the micro-batcher queues and hands back: one request's work item (its job,
deadline and future, and whether it was given up), the key batches form under, a
batch's merged job and its statistics, a request's follow-up rounds after its batch,
and ``Abandoned``, which a compute function raises when every request of its job was
given up."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from service.transport.interface import Job, JobResult

# Items batch together only under the same key: (model name, layer).
BatchKey = tuple[str, str]


class Abandoned(Exception):
    """Raised by a compute function whose ``should_stop()`` said yes: every request of
    the job was given up (client gone, deadline passed), so the rest was not computed."""


class ItemFuture(Future[JobResult]):
    """A request's future. ``Future.cancel()`` cannot stop a running one; this one then
    marks it ``abandoned``, which the model loop checks between target rounds."""

    abandoned = False

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if not self.done():
            self.abandoned = True
        return False


@dataclass
class WorkItem:
    """One request's job; ``future`` receives its ``JobResult``."""

    job: Job
    deadline: float  # time.monotonic() after which the result is useless
    future: ItemFuture = field(default_factory=ItemFuture)
    enqueued_at: float = field(default_factory=time.monotonic)

    def given_up(self, now: float) -> bool:
        """Nobody wants the result any more (cancelled while running, or too late)."""
        return self.future.abandoned or now > self.deadline

    @property
    def key(self) -> BatchKey:
        return (self.job.model, self.job.layer)

    @property
    def size(self) -> int:
        return self.job.size

    @property
    def work(self) -> float:
        return self.job.work

    @property
    def round_work(self) -> float:
        """What each of its follow-up rounds costs, in images (0: it has none)."""
        rounds = self.job.rounds
        return (self.work - self.size) / rounds if rounds else 0.0


# A request's work after its batch (faithfulness curves; later the gradient-free
# methods), in rounds: each ``next()`` computes one round and yields the work it was (in
# images, as ``Job.work`` counts), so the model loop can run other requests between
# rounds; the generator returns the request's whole result.
FollowUp = Generator[float, None, JobResult]


@dataclass
class Continuing:
    """A request whose batch is done and whose follow-up rounds are not."""

    item: WorkItem
    rounds: FollowUp
    remaining_work: float  # what its rounds still cost, in images
    queue_wait_s: float  # before its batch started
    compute_s: float  # its batch's, then its rounds' too
    batch_images: int


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch looked like, for metrics."""

    images: int
    items: int
    queue_waits_s: tuple[float, ...]
    compute_s: float


def merge_jobs(jobs: Sequence[Job]) -> Job:
    """One job of every image of ``jobs`` (same model and layer), in order."""
    if len(jobs) == 1:
        return jobs[0]
    return Job(
        model=jobs[0].model,
        layer=jobs[0].layer,
        images=[image for job in jobs for image in job.images],
        boxes=[box for job in jobs for box in job.boxes],
        targets=[t for job in jobs for t in job.targets],
        methods=[m for job in jobs for m in job.methods],
        faithfulness=(
            [f for job in jobs for f in job.wants_faithfulness()]
            if any(job.faithfulness for job in jobs)
            else []
        ),
    )
