"""Batch-size buckets: the few batch sizes a bucketed engine runs, and a job padded up to
one of them (and the padding's results dropped again).

With buckets on (``batch_buckets``, or CUDA graphs), every batch runs at one of a few
fixed sizes, so cuDNN's per-shape algorithm search and any per-shape graph capture
happen once per bucket, at warm-up, instead of during live requests.
"""

from __future__ import annotations

import numpy as np

from service.transport.interface import Job, JobResult


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a bucketed engine runs: powers of two, and the largest batch."""
    sizes = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` images (``n`` itself past the largest)."""
    return next((size for size in buckets if size >= n), n)


def pad_job(job: Job, size: int) -> Job:
    """``job`` with blank images added up to ``size`` (each explains its top-1 class with
    the first image's method; their results are dropped by ``unpad_result``)."""
    extra = size - len(job.images)
    if extra <= 0:
        return job
    blank = np.zeros_like(job.images[-1])
    top1: list[int | None] = [None]
    return Job(
        job.model,
        job.layer,
        [*job.images, *[blank] * extra],
        [*job.boxes, *[None] * extra],
        [*job.targets, *[top1] * extra],
        [*job.methods, *[job.methods[0]] * extra],
        [*job.faithfulness, *[False] * extra] if job.faithfulness else [],
    )


def unpad_result(result: JobResult, n: int) -> JobResult:
    """The first ``n`` images' part of ``result``."""
    if len(result.targets) == n:
        return result
    return result.slice(0, n, result.timings)
