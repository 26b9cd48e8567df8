"""The engine of one device: loaded models, their Grad-CAM engines, the micro-batcher.

``start()`` loads every model of the models file, starts the model loop, and
runs one warm-up explanation per model (``warm_up``), so the first real request
pays no one-time cost; ``ready()`` turns true only after that.

A ``Runtime`` is the ``interface.Engine`` of an in-process caller (the CLI,
tests) and what the engine process (``engine.process``) serves over its socket.
Jobs arrive as raw pixels at the model's input size; normalisation happens on
the device, after one copy of the (usually 8-bit) batch to it (``batch_inputs``).
Batches run at bucketed sizes when buckets are on (``buckets``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

import torch
from torch import Tensor

from service import metrics
from service.contract.errors import ConfigError
from service.contract.models_file import ModelsFile
from service.contract.settings import Settings
from service.engine import faithfulness
from service.engine.batch_inputs import batch_inputs, normaliser
from service.engine.batching import BatcherCallbacks, MicroBatcher, QueueLimits
from service.engine.buckets import bucket_for, bucket_sizes, pad_job, unpad_result
from service.engine.cuda_graphs import CudaGraph, Graph, GraphCache
from service.engine.gradcam import GradCAM
from service.engine.loading.models import LoadedModel, load_model
from service.engine.tuning import Execution, tune
from service.engine.warm_up import warm_up
from service.engine.work_items import BatchStats, FollowUp, WorkItem
from service.transport.interface import FAITHFULNESS_WORK, Catalog, Job, JobResult, wait_for

logger = logging.getLogger(__name__)


def _scores(model: LoadedModel, logits: Tensor) -> Tensor:
    """Sigmoid scores for a multilabel model, else softmax probabilities."""
    return torch.sigmoid(logits) if model.multilabel else torch.softmax(logits, dim=1)


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
        self._explainers: dict[str, GradCAM] = {}
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
        """Choose the device, load every model of the models file, start the model loop
        and warm every model up (module text); ``ready()`` is true after this."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self._choose_device()
        config: ModelsFile = self.settings.models_config()
        for name in config.models:
            self._load(name, config)
        self.default_model = config.default_model
        self._catalog = self._make_catalog()
        self._batcher = self._make_batcher()
        for model in self.models.values():
            warm_up(model, self.device, self._buckets, self.settings.max_batch_size, self.run)
        self.started = True
        logger.info(
            "engine ready: %d model(s) on %s, %d torch threads, pid %d",
            len(self.models),
            self.device,
            torch.get_num_threads(),
            os.getpid(),
        )
        return self

    def _choose_device(self) -> None:
        """The device, and what runs on it: cuDNN's kernel search, CUDA graphs, buckets."""
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

    def _load(self, name: str, config: ModelsFile) -> None:
        """Load model ``name``, choose how it runs and give it its engine, logged."""
        model = load_model(name, config, self.device)
        self.models[name] = model
        execution = self._tune(model)
        self._executions[name] = execution
        self._explainers[name] = GradCAM(
            model.module,
            self.device,
            self.settings.autocast,
            dtype=torch.bfloat16 if execution.precision == "bf16" else None,
            channels_last=execution.channels_last,
        )
        self._normalisers[name] = normaliser(model, self.device)
        metrics.MODEL_LOAD_SECONDS.labels(name).set(model.load_seconds)
        labels = (name, model.spec.arch, model.default_layer, str(self.device))
        metrics.MODEL_INFO.labels(*labels).set(1)
        logger.info(
            "loaded model '%s' (%s) on %s in %.2f s",
            name,
            model.spec.arch,
            self.device,
            model.load_seconds,
        )

    def _make_catalog(self) -> Catalog:
        """What the HTTP side is told of the loaded models, with how each runs."""
        return Catalog(
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

    def _make_batcher(self) -> MicroBatcher:
        """The model loop, with the settings' queue limits, reporting to the metrics."""
        return MicroBatcher(
            self._compute,
            follow_up=self._follow_up,
            limits=QueueLimits(
                max_batch_size=self.settings.max_batch_size,
                max_batch_delay_s=self.settings.max_batch_delay_s,
                max_queue=self.settings.max_queue,
                max_queue_wait_s=self.settings.max_queue_wait_s,
            ),
            callbacks=BatcherCallbacks(
                on_batch=_record_batch,
                on_queue_depth=metrics.QUEUE_DEPTH.set,
                on_idle=metrics.ENGINE_IDLE.inc,
                on_fatal=self._on_fatal,
            ),
        )

    def _tune(self, model: LoadedModel) -> Execution:
        """Memory format and precision for ``model`` (``tuning.py``), logged."""
        execution = tune(model, self.device)
        if execution.fell_back:
            metrics.PRECISION_FALLBACKS.labels(model.name).inc()
            logger.warning("model '%s' runs in float32: %s", model.name, execution.why)
        logger.info("model '%s': %s", model.name, execution.why)
        return execution

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
        inputs = batch_inputs(model, job, self.device, self._normalisers[model.name])
        result = self._graphed(model, job, inputs)
        if result is not None:
            return result
        batch = self._explainers[job.model](
            inputs, job.layer, job.targets, job.methods, should_stop
        )
        return JobResult(
            scores=_scores(model, batch.logits).numpy(),
            logits=batch.logits.numpy(),
            targets=batch.targets,
            maps=[[cam.numpy() for cam in cams] for cams in batch.cams],
        )

    def _follow_up(self, job: Job, result: JobResult) -> FollowUp | None:
        """One request's faithfulness curves after its batch, one explanation a round
        (the batcher runs other requests between rounds), or None if it wants none."""
        if not any(job.faithfulness):
            return None
        return self._curve_rounds(job, result)

    def _curve_rounds(self, job: Job, result: JobResult) -> FollowUp:
        model = self.models[job.model]
        explainer = self._explainers[job.model]
        rounds = faithfulness.curve_rounds(
            lambda x: _scores(model, explainer.logits(x)),
            faithfulness.Explanations(
                inputs=batch_inputs(model, job, self.device, self._normalisers[model.name]),
                scores=torch.from_numpy(result.scores),
                cams=[[torch.from_numpy(m) for m in maps] for maps in result.maps],
                targets=result.targets,
                wanted=job.faithfulness,
            ),
        )
        while True:
            try:
                next(rounds)
            except StopIteration as done:
                return replace(result, curves=done.value)
            yield FAITHFULNESS_WORK

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
            self._explainers[job.model],
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
        self._explainers.clear()
