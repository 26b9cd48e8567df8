"""``library = "torchvision"`` (the default): a torchvision classification model by name,
or any ``package.module:factory`` (``architecture.py``). torchvision's named weights give
their normalisation (the weights' transforms); a named architecture gets the input
channels of the models file by a rebuilt first convolution."""

from __future__ import annotations

from typing import Any

from service.contract.models_file import ModelsFile, ModelSpec
from service.engine.loading.architecture import adapt_input_channels, build_architecture
from service.engine.loading.libraries import Built
from service.engine.loading.preprocessing import LibraryConfig
from service.engine.loading.weights import torchvision_weights

SOURCE = "torchvision's weights"


def build(name: str, spec: ModelSpec, num_classes: int | None, models: ModelsFile) -> Built:
    model = build_architecture(name, spec, num_classes, models.base_dir)
    if ":" not in spec.arch:
        adapt_input_channels(model, spec.channels)
    weights = torchvision_weights(name, spec, models)
    values: dict[str, Any] = {}
    if weights is not None:
        transform = weights.transforms()
        for key in ("mean", "std"):
            if hasattr(transform, key):
                values[key] = tuple(getattr(transform, key))
    labels = tuple(weights.meta["categories"]) if weights and "categories" in weights.meta else None
    return Built(model, LibraryConfig(SOURCE, values), labels)
