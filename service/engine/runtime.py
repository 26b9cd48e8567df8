"""The per-process runtime: owns the loaded models, their engines and the batcher.

One ``Runtime`` per worker process (or per CLI run). ``start()`` loads every
model of the models file, starts the micro-batcher's consumer thread, and runs
one warm-up explanation per model, so the first real request pays no one-time
cost; ``ready`` turns true only after that.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from service import metrics
from service.engine.batching import BatchKey, BatchStats, MicroBatcher, WorkItem, wait
from service.engine.gradcam import CamBatch, GradCAM
from service.engine.models import LoadedModel, load_model
from service.errors import ConfigError, UnknownModel
from service.settings import ModelsFile, Settings

logger = logging.getLogger(__name__)


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("GRADCAM_DEVICE is 'cuda' but no CUDA device is available")
    return torch.device(setting)


def _record_batch(stats: BatchStats) -> None:
    metrics.BATCH_SIZE.observe(stats.images)
    for waited in stats.queue_waits_s:
        metrics.STAGE_DURATION.labels("queue_wait").observe(waited)
        metrics.STAGE_DURATION.labels("compute").observe(stats.compute_s)


class Runtime:
    """Loaded models, their engines, and the batcher every engine call goes through."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.models: dict[str, LoadedModel] = {}
        self.default_model = ""
        self.device = torch.device("cpu")
        self._engines: dict[str, GradCAM] = {}
        self._batcher: MicroBatcher | None = None
        self.ready = False

    def start(self) -> Runtime:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.device = choose_device(self.settings.device)
        if self.device.type == "cuda":
            # Fixed input sizes: let cuDNN pick the fastest kernels once.
            torch.backends.cudnn.benchmark = True
        config: ModelsFile = self.settings.models_config()
        for name in config.models:
            model = load_model(name, config, self.device)
            self.models[name] = model
            self._engines[name] = GradCAM(model.module, self.device, self.settings.autocast)
            metrics.MODEL_LOAD_SECONDS.labels(name).set(model.load_seconds)
            metrics.MODEL_INFO.labels(name, model.spec.arch, model.default_layer,
                                      str(self.device)).set(1)
            logger.info("loaded model '%s' (%s) on %s in %.2f s", name, model.spec.arch,
                        self.device, model.load_seconds)
        self.default_model = config.default_model
        self._batcher = MicroBatcher(
            self._run_engine, max_batch_size=self.settings.max_batch_size,
            max_batch_delay_s=self.settings.max_batch_delay_s,
            max_queue=self.settings.max_queue, on_batch=_record_batch,
            on_queue_depth=metrics.QUEUE_DEPTH.set)
        for model in self.models.values():
            self._warm_up(model)
        self.ready = True
        logger.info("runtime ready: %d model(s), %d torch threads, pid %d", len(self.models),
                    torch.get_num_threads(), os.getpid())
        return self

    def _warm_up(self, model: LoadedModel) -> None:
        blank = torch.zeros(1, model.channels, *model.input_size)
        self.compute(model, blank, model.default_layer, [[None]], ["gradcam"])

    def _run_engine(self, key: BatchKey, inputs: torch.Tensor,
                    targets: list[list[int | None]], methods: list[str]) -> CamBatch:
        name, layer = key
        if self.device.type == "cuda":
            inputs = inputs.pin_memory()
        return self._engines[name](inputs, layer, targets, methods)

    def get_model(self, name: str | None) -> LoadedModel:
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise UnknownModel(f"There is no model '{key}'. Models served: {known}.",
                               field="model") from None

    def compute(self, model: LoadedModel, inputs: torch.Tensor, layer: str,
                targets: list[list[int | None]], methods: list[str],
                disconnected: Callable[[], bool] | None = None) -> CamBatch:
        """Explain ``inputs`` through the batcher; waits up to ``request_timeout_s``."""
        if self._batcher is None:
            raise RuntimeError("the runtime is not started")
        deadline = time.monotonic() + self.settings.request_timeout_s
        item = WorkItem(key=(model.name, layer), inputs=inputs, targets=targets,
                        methods=methods, deadline=deadline)
        return wait(self._batcher.submit(item), deadline, disconnected)

    def close(self) -> None:
        self.ready = False
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        self.models.clear()
        self._engines.clear()
