"""Batches padded to fixed buckets (``GRADCAM_BATCH_BUCKETS=on``, for cuDNN and CUDA
graphs): the bucket choice, and answers equal to unpadded ones."""

from __future__ import annotations

import time

import numpy as np

from service.engine.runtime import Runtime, bucket_for, bucket_sizes, pad_job
from service.interface import Job
from service.settings import Settings


def test_bucket_sizes_are_powers_of_two_and_the_largest_batch() -> None:
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(1) == (1,)
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 2, 3, 5, 8, 9, 12, 13)] == [
        1, 2, 4, 8, 8, 12, 12, 13]


def _job(n: int) -> Job:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (128, 128, 1), dtype=np.uint8) for _ in range(n)]
    boxes = [None, (10, 0, 118, 128), None][:n]
    targets: list[list[int | None]] = [[None], [0, 2], [3]][:n]
    return Job("phantom", "features", images, boxes, targets,
               ["gradcam", "layercam", "gradcam++"][:n])


def test_a_padded_job_has_blank_top1_images_after_the_real_ones() -> None:
    job = pad_job(_job(3), 8)
    assert len(job.images) == 8 and job.targets[3:] == [[None]] * 5
    assert all(not image.any() for image in job.images[3:])
    assert job.methods[3:] == ["gradcam"] * 5 and job.boxes[3:] == [None] * 5
    unpadded = _job(3)
    assert pad_job(unpadded, 3) is unpadded


def test_bucketed_answers_equal_unpadded_ones() -> None:
    plain = Runtime(Settings(device="cpu")).start()
    padded = Runtime(Settings(device="cpu", batch_buckets="on", max_batch_size=8)).start()
    try:
        for n in (1, 2, 3):
            a = plain.run(_job(n), time.monotonic() + 60)
            b = padded.run(_job(n), time.monotonic() + 60)
            assert len(b.targets) == n and b.targets == a.targets
            np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
            for maps_a, maps_b in zip(a.maps, b.maps, strict=True):
                for x, y in zip(maps_a, maps_b, strict=True):
                    np.testing.assert_allclose(y, x, atol=1e-4 * max(1.0, float(x.max())))
    finally:
        plain.close()
        padded.close()
