"""The engine of one device: loaded models, their Grad-CAM engines, the micro-batcher.

``start()`` loads every model of the models file, starts the model loop, and
runs one warm-up explanation per model, so the first real request pays no
one-time cost; ``ready()`` turns true only after that.

A ``Runtime`` is the ``interface.Engine`` of an in-process caller (the CLI,
tests) and what the engine process (``engine.process``) serves over its socket.
Jobs arrive as raw pixels at the model's input size; normalisation happens
here, on the device, after one copy of the (usually 8-bit) batch to it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from service import metrics
from service.contract.errors import ConfigError, ServiceError
from service.contract.settings import ModelsFile, Settings
from service.engine.batching import BatchStats, MicroBatcher, WorkItem
from service.engine.cuda_graphs import CudaGraph, Graph, GraphCache
from service.engine.gradcam import GradCAM
from service.engine.models import LoadedModel, load_model
from service.engine.tuning import Execution, tune
from service.transport.interface import Catalog, Job, JobResult, wait_for

logger = logging.getLogger(__name__)


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
    )


def unpad_result(result: JobResult, n: int) -> JobResult:
    """The first ``n`` images' part of ``result``."""
    if len(result.targets) == n:
        return result
    return result.slice(0, n, result.timings)


def _scores(model: LoadedModel, logits: Tensor) -> Tensor:
    """Sigmoid scores for a multilabel model, else softmax probabilities."""
    return torch.sigmoid(logits) if model.spec.multilabel else torch.softmax(logits, dim=1)


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"GRADCAM_DEVICE is '{setting}' but no CUDA device is available")
    device = torch.device(setting)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"GRADCAM_DEVICE is '{setting}' but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch.cuda.set_device(device)
    return device


def _record_batch(stats: BatchStats) -> None:
    metrics.BATCH_SIZE.observe(stats.images)
    metrics.BATCH_DURATION.observe(stats.compute_s)
    for waited in stats.queue_waits_s:
        metrics.STAGE_DURATION.labels("queue_wait").observe(waited)
        metrics.STAGE_DURATION.labels("compute").observe(stats.compute_s)


class InvalidJob(ServiceError):
    """A job whose pixels do not fit the model: a bug on the sending side, not the client's."""


class Runtime:
    """Loaded models, their engines, and the batcher every engine call goes through."""

    def __init__(
        self,
        settings: Settings | None = None,
        device: str | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self._device_setting = device or self.settings.device
        self.models: dict[str, LoadedModel] = {}
        self.default_model = ""
        self.device = torch.device("cpu")
        self._engines: dict[str, GradCAM] = {}
        self._executions: dict[str, Execution] = {}
        self._buckets: tuple[int, ...] = ()
        self._graphs: GraphCache | None = None
        self._make_graph: Callable[[torch.device], Graph] = CudaGraph
        self._normalisers: dict[str, tuple[Tensor, Tensor]] = {}
        self._batcher: MicroBatcher | None = None
        self._catalog: Catalog | None = None
        self._on_fatal = on_fatal
        self.started = False

    def start(self) -> Runtime:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.device = choose_device(self._device_setting)
        if self.device.type == "cuda":
            # cuDNN picks the fastest kernels once per input shape: the warm-up meets
            # every shape first (each batch size, or each bucket).
            torch.backends.cudnn.benchmark = True
        graphs = self.settings.cuda_graphs
        if graphs == "on" or (graphs == "auto" and self.device.type == "cuda"):
            self._graphs = GraphCache(self._make_graph)
        if self.settings.batch_buckets == "on" or self._graphs is not None:
            self._buckets = bucket_sizes(self.settings.max_batch_size)
        config: ModelsFile = self.settings.models_config()
        for name in config.models:
            model = load_model(name, config, self.device)
            self.models[name] = model
            execution = self._tune(model)
            self._executions[name] = execution
            self._engines[name] = GradCAM(
                model.module,
                self.device,
                self.settings.autocast,
                dtype=torch.bfloat16 if execution.precision == "bf16" else None,
                channels_last=execution.channels_last,
            )
            shape = (1, -1, 1, 1)
            self._normalisers[name] = (
                torch.tensor(model.mean, dtype=torch.float32, device=self.device).view(shape),
                torch.tensor(model.std, dtype=torch.float32, device=self.device).view(shape),
            )
            metrics.MODEL_LOAD_SECONDS.labels(name).set(model.load_seconds)
            metrics.MODEL_INFO.labels(
                name, model.spec.arch, model.default_layer, str(self.device)
            ).set(1)
            logger.info(
                "loaded model '%s' (%s) on %s in %.2f s",
                name,
                model.spec.arch,
                self.device,
                model.load_seconds,
            )
        self.default_model = config.default_model
        self._catalog = Catalog(
            {
                name: replace(
                    m.info(),
                    precision=self._executions[name].precision,
                    memory_format="channels_last"
                    if self._executions[name].channels_last
                    else "contiguous",
                )
                for name, m in self.models.items()
            },
            self.default_model,
        )
        self._batcher = MicroBatcher(
            self._compute,
            max_batch_size=self.settings.max_batch_size,
            max_batch_delay_s=self.settings.max_batch_delay_s,
            max_queue=self.settings.max_queue,
            max_queue_wait_s=self.settings.max_queue_wait_s,
            on_batch=_record_batch,
            on_queue_depth=metrics.QUEUE_DEPTH.set,
            on_idle=metrics.ENGINE_IDLE.inc,
            on_fatal=self._on_fatal,
        )
        for model in self.models.values():
            self._warm_up(model)
        self.started = True
        logger.info(
            "engine ready: %d model(s) on %s, %d torch threads, pid %d",
            len(self.models),
            self.device,
            torch.get_num_threads(),
            os.getpid(),
        )
        return self

    def _tune(self, model: LoadedModel) -> Execution:
        """Memory format and precision for ``model`` (``tuning.py``), logged."""
        spec = model.spec
        execution = tune(
            model.module,
            self.device,
            model.channels,
            model.input_size,
            model.default_layer,
            spec.memory_format,
            spec.precision,
            spec.multilabel,
            spec.fold_batch_norm,
        )
        if execution.fell_back:
            metrics.PRECISION_FALLBACKS.labels(model.name).inc()
            logger.warning("model '%s' runs in float32: %s", model.name, execution.why)
        logger.info("model '%s': %s", model.name, execution.why)
        return execution

    def _warm_up(self, model: LoadedModel) -> None:
        """One explanation per batch shape the engine will meet first under load: on a
        CPU batch 1; on CUDA each bucket, or each batch size up to the largest (cuDNN's
        search took 0.7-1.4 s per new batch size on an H200: live requests paid it)."""
        if self.device.type != "cuda":
            sizes: tuple[int, ...] = (1,)
        else:
            sizes = self._buckets or tuple(range(1, self.settings.max_batch_size + 1))
        blank = np.zeros((*model.input_size, model.channels), dtype=np.uint8)
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
            self.run(job, time.monotonic() + 600)
        if len(sizes) > 1:
            logger.info(
                "model '%s' warmed up at %d batch sizes in %.1f s",
                model.name,
                len(sizes),
                time.monotonic() - started,
            )

    # --- the Engine protocol (in-process) ---------------------------------------

    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise RuntimeError("the runtime is not started")
        return self._catalog

    def submit(self, job: Job, deadline: float) -> Future[JobResult]:
        """Queue ``job``; its future fails with the batcher's errors (503, 504)."""
        if self._batcher is None:
            raise RuntimeError("the runtime is not started")
        return self._batcher.submit(WorkItem(job=job, deadline=deadline))

    def run(
        self, job: Job, deadline: float, disconnected: Callable[[], bool] | None = None
    ) -> JobResult:
        return wait_for(self.submit(job, deadline), deadline, disconnected)

    @property
    def healthy(self) -> bool:
        """Models loaded and the model loop alive."""
        batcher = self._batcher  # close() may clear it from another thread
        return self.started and batcher is not None and batcher.alive

    def ready(self, timeout_s: float = 1.0) -> bool:
        return self.healthy

    @property
    def queue_depth(self) -> int:
        batcher = self._batcher
        return batcher.depth if batcher is not None else 0

    # --- the model loop's work --------------------------------------------------

    def _inputs(self, model: LoadedModel, job: Job) -> Tensor:
        """``(N, C, H, W) float32`` normalised on the device from the job's raw pixels."""
        height, width = model.input_size
        for i, image in enumerate(job.images):
            if (
                image.ndim != 3
                or image.shape[:2] != (height, width)
                or image.shape[2] not in (1, model.channels)
                or image.dtype not in (np.uint8, np.float32)
            ):
                channels = "1" if model.channels == 1 else f"1 or {model.channels}"
                raise InvalidJob(
                    f"image {i} of the job is {image.dtype}{list(image.shape)}, not "
                    f"({height}, {width}, {channels}) uint8 or float32"
                )
        cuda = self.device.type == "cuda"
        groups: dict[tuple[str, int], list[int]] = {}
        for i, image in enumerate(job.images):
            groups.setdefault((image.dtype.name, image.shape[2]), []).append(i)
        inputs = torch.empty(len(job.images), model.channels, height, width, device=self.device)
        for (dtype, _), indices in groups.items():
            # One host array and one copy per kind of image (usually a single uint8 one).
            host = torch.from_numpy(np.stack([job.images[i] for i in indices]))
            if cuda:
                host = host.pin_memory()
            pixels = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            if dtype == "uint8":
                pixels = pixels / 255.0
            index = torch.tensor(indices, device=self.device)
            inputs.index_copy_(0, index, pixels.expand(-1, model.channels, -1, -1))
        mean, std = self._normalisers[model.name]
        inputs = (inputs - mean) / std
        for i, box in enumerate(job.boxes):
            if box is not None:
                # Letterbox: what lies outside the image is exactly 0 after normalisation.
                x0, y0, x1, y1 = box
                keep = inputs[i, :, y0:y1, x0:x1].clone()
                inputs[i].zero_()
                inputs[i, :, y0:y1, x0:x1] = keep
        return inputs

    def _compute(self, job: Job, should_stop: Callable[[], bool] | None = None) -> JobResult:
        if self._buckets:
            # A few fixed shapes: cuDNN's per-shape algorithm search (cudnn.benchmark)
            # and any per-shape capture happen once per bucket, at warm-up.
            n = len(job.images)
            return unpad_result(
                self._compute_exact(pad_job(job, bucket_for(n, self._buckets)), should_stop), n
            )
        return self._compute_exact(job, should_stop)

    def _compute_exact(self, job: Job, should_stop: Callable[[], bool] | None = None) -> JobResult:
        model = self.models[job.model]
        inputs = self._inputs(model, job)
        graphed = self._graphed(model, job, inputs)
        if graphed is not None:
            return graphed
        batch = self._engines[job.model](inputs, job.layer, job.targets, job.methods, should_stop)
        scores = _scores(model, batch.logits)
        return JobResult(
            scores=scores.numpy(),
            logits=batch.logits.numpy(),
            targets=batch.targets,
            maps=[[cam.numpy() for cam in cams] for cams in batch.cams],
        )

    def _graphed(self, model: LoadedModel, job: Job, inputs: Tensor) -> JobResult | None:
        """The job's answer from a CUDA graph (``cuda_graphs.py``), or None: eager."""
        n = len(job.images)
        if (
            self._graphs is None
            or n not in self._buckets
            or len(set(job.methods)) != 1
            or any(len(t) != 1 for t in job.targets)
            or any(t[0] is not None and not 0 <= t[0] < model.num_classes for t in job.targets)
        ):
            return None
        given = torch.tensor([-1 if t[0] is None else t[0] for t in job.targets], dtype=torch.long)
        out = self._graphs.run(
            (job.model, job.layer, job.methods[0], n),
            self._engines[job.model],
            inputs,
            given.to(self.device),
        )
        if out is None:
            return None
        logits, maps = (tensor.cpu() for tensor in out)
        scores = _scores(model, logits)
        top1 = logits.argmax(dim=1).tolist()
        targets = [[top1[i] if t[0] is None else t[0]] for i, t in enumerate(job.targets)]
        return JobResult(
            scores=scores.numpy(),
            logits=logits.numpy(),
            targets=targets,
            maps=[[m.numpy()] for m in maps],
        )

    def close(self, drain: bool = False, timeout_s: float = 10.0) -> None:
        self.started = False
        if self._batcher is not None:
            self._batcher.close(timeout_s, drain=drain)
            self._batcher = None
        self.models.clear()
        self._engines.clear()
