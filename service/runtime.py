"""The per-process runtime: owns the loaded models and their engines.

One ``Runtime`` per worker process (or per CLI run). ``start()`` loads every
model of the models file and runs one warm-up explanation each, so the first
real request pays no one-time cost; ``ready`` turns true only after that.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from service.config import ModelsFile, Settings
from service.errors import UnknownModel
from service.gradcam import CamBatch, GradCAM
from service.models import LoadedModel, load_model

logger = logging.getLogger(__name__)


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        from service.errors import ConfigError

        raise ConfigError("GRADCAM_DEVICE is 'cuda' but no CUDA device is available")
    return torch.device(setting)


class Runtime:
    """Loaded models, their engines, and the one place the engine is called from."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.models: dict[str, LoadedModel] = {}
        self.default_model = ""
        self.device = torch.device("cpu")
        self._engines: dict[str, GradCAM] = {}
        # The engine is not re-entrant (hooks on shared modules): one call at a time.
        self._lock = threading.Lock()
        self.ready = False

    def start(self) -> Runtime:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.device = choose_device(self.settings.device)
        config: ModelsFile = self.settings.models_config()
        for name in config.models:
            model = load_model(name, config, self.device)
            self.models[name] = model
            self._engines[name] = GradCAM(model.module, self.device)
            logger.info("loaded model '%s' (%s) on %s in %.2f s", name, model.spec.arch,
                        self.device, model.load_seconds)
        self.default_model = config.default_model
        for model in self.models.values():
            self._warm_up(model)
        self.ready = True
        logger.info("runtime ready: %d model(s), pid %d", len(self.models), os.getpid())
        return self

    def _warm_up(self, model: LoadedModel) -> None:
        blank = torch.zeros(1, model.channels, *model.input_size)
        self.compute(model, blank, model.default_layer, [[None]], ["gradcam"])

    def get_model(self, name: str | None) -> LoadedModel:
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise UnknownModel(f"There is no model '{key}'. Models served: {known}.",
                               field="model") from None

    def compute(self, model: LoadedModel, inputs: torch.Tensor, layer: str,
                targets: list[list[int | None]], methods: list[str]) -> CamBatch:
        """Run the engine on one batch (later: through the micro-batcher)."""
        with self._lock:
            return self._engines[model.name](inputs, layer, targets, methods)

    def close(self) -> None:
        self.ready = False
        self.models.clear()
        self._engines.clear()
