"""The warm-up: one explanation per batch shape a model will meet first under load, run
at start-up so that the first real requests pay no one-time cost."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from service.engine.loading.models import LoadedModel
from service.transport.interface import Job, JobResult

logger = logging.getLogger(__name__)


def warm_up(
    model: LoadedModel,
    device: torch.device,
    buckets: tuple[int, ...],
    max_batch_size: int,
    run: Callable[[Job, float], JobResult],
) -> None:
    """One explanation per batch shape the engine will meet first under load: on a
    CPU batch 1; on CUDA each bucket, or each batch size up to the largest (cuDNN's
    search took 0.7-1.4 s per new batch size on an H200: live requests paid it).
    ``run`` is the runtime's own: each one goes through the model loop."""
    if device.type != "cuda":
        sizes: tuple[int, ...] = (1,)
    else:
        sizes = buckets or tuple(range(1, max_batch_size + 1))
    # An image model's blank is 8-bit; a volume model takes float32 volumes only.
    volume = model.preprocessing.volume is not None
    blank = np.zeros((*model.input_size, model.channels), np.float32 if volume else np.uint8)
    started = time.monotonic()
    for size in sizes:
        job = Job(
            model.name,
            model.default_layer,
            [blank] * size,
            [None] * size,
            [[None]] * size,
            ["gradcam"] * size,
        )
        run(job, time.monotonic() + 600)
    if len(sizes) > 1:
        logger.info(
            "model '%s' warmed up at %d batch sizes in %.1f s",
            model.name,
            len(sizes),
            time.monotonic() - started,
        )
