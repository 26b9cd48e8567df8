"""Where a models-file model comes from: one module per ``library`` (``from_<library>``,
a dot written as an underscore: ``from_torch_export``),
each building the untrained module ``arch`` names with ``arch_args``, and saying what its
library's own config knows of the model: how its input is preprocessed, its labels,
whether it is multi-label. Weights, outputs and layers are then the same for all
(``loading/models.py``). Adding a library is adding a module here and a name to
``contract.terms.Library``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from service.contract.models_file import ModelsFile, ModelSpec
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.preprocessing import LibraryConfig

# The pip extra that installs each optional library.
EXTRAS = {"timm": "timm", "transformers": "transformers", "monai": "monai"}


@dataclass
class Built:
    """A library's model before its weights: the module, what the library's config says
    of its input, and its labels and multi-label flag where the config gives them."""

    module: nn.Module
    config: LibraryConfig
    labels: tuple[str, ...] | None = None
    multilabel: bool | None = None
    # Loaded by the library itself (a Hugging Face folder, timm's pretrained tag): the
    # models file's weights are not read again over them.
    weights_loaded: bool = False
    notes: list[str] = field(default_factory=list)
    # What more than ``module.to(device)`` moves it there (an exported graph's devices).
    place: Callable[[nn.Module, torch.device], None] | None = None


def require(name: str, library: str) -> ModuleType:
    """The optional library, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(library)
    except ImportError:
        raise ModelConfigError(
            name,
            "library",
            f'library = "{library}" needs {library}, which is not installed: '
            f"pip install 'gradcam-service[{EXTRAS[library]}]'",
        ) from None


def build(name: str, spec: ModelSpec, num_classes: int | None, models: ModelsFile) -> Built:
    """The model ``spec`` names, from its library, with ``num_classes`` outputs if given."""
    source = spec.library.replace(".", "_")
    module = importlib.import_module(f"service.engine.loading.libraries.from_{source}")
    built: Built = module.build(name, spec, num_classes, models)
    return built


def call_factory(name: str, factory: Any, what: str, kwargs: dict[str, Any]) -> nn.Module:
    """``factory(**kwargs)``; what it refuses, and anything not a module, is a mistake on
    ``arch_args`` (or ``arch``), named."""
    try:
        model = factory(**kwargs)
    except Exception as error:  # the library's own message says what it refuses
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelConfigError(name, "arch_args", f"{what}({shown}) failed: {error}") from None
    if not isinstance(model, nn.Module):
        raise ModelConfigError(
            name, "arch", f"{what} returned {type(model).__name__}, not a module"
        )
    return model
