"""``library = "monai"``: a network of ``monai.networks.nets`` (a class such as
``DenseNet121``, or a factory such as ``resnet18``), called with ``arch_args``.

MONAI's networks take ``spatial_dims`` (2 here, unless given), their input channels
(``in_channels`` or ``n_input_channels``) and class count (``out_channels`` or
``num_classes``) under names of their own: the models file's ``channels`` and
``num_classes`` fill whichever the network takes. MONAI trains on intensities scaled to
[0, 1], so the default normalisation is none (mean 0, std 1), not ImageNet's. Its ViT
returns its logits with its hidden states; ``outputs.py`` finds the logits.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from typing import Any

from service.contract.models_file import ModelsFile, ModelSpec
from service.contract.suggestions import close_matches, did_you_mean
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.libraries import Built, call_factory, require
from service.engine.loading.preprocessing import LibraryConfig

SOURCE = "MONAI (intensities in [0, 1])"
_CHANNELS = ("in_channels", "n_input_channels")
_CLASSES = ("out_channels", "num_classes")


def build(name: str, spec: ModelSpec, num_classes: int | None, models: ModelsFile) -> Built:
    monai = require(name, "monai")
    nets = monai.networks.nets
    factory = getattr(nets, spec.arch, None)
    if not callable(factory):
        known = [n for n in dir(nets) if not n.startswith("_") and callable(getattr(nets, n))]
        raise ModelConfigError(
            name,
            "arch",
            f"monai.networks.nets has no network '{spec.arch}'."
            f"{did_you_mean(close_matches(spec.arch, known))}",
        )
    parameters = _parameters(factory)
    kwargs: dict[str, Any] = dict(spec.arch_args)
    if "spatial_dims" in parameters:
        kwargs.setdefault("spatial_dims", 2)
    if "pretrained" in parameters:
        kwargs.setdefault("pretrained", spec.weights == "pretrained")
    _fill(kwargs, parameters, _CHANNELS, spec.channels if spec.given("channels") else None)
    _fill(kwargs, parameters, _CLASSES, num_classes)
    model = call_factory(name, factory, f"monai.networks.nets.{spec.arch}", kwargs)
    channels = next((kwargs[key] for key in _CHANNELS if key in kwargs), None)
    values: dict[str, Any] = {"mean": (0.0,), "std": (1.0,)}
    if channels is not None:
        values["channels"] = int(channels)
    return Built(model, LibraryConfig(SOURCE, values), weights_loaded=spec.weights == "pretrained")


def _parameters(factory: Any) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``factory`` takes, with those its ``**kwargs`` pass on: a
    factory function's (``resnet18(pretrained, progress, **kwargs) -> ResNet``: those of
    the network it returns) or a subclass's (``SEResNet50(..., **kwargs)``: its bases').
    Without them a network taking ``**kwargs`` would get no ``spatial_dims`` (a 3D net),
    nor the file's channels and class count."""
    found = dict(inspect.signature(factory).parameters)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in found.values()):
        return found
    if inspect.isclass(factory):
        passed_to = [base for base in factory.__mro__[1:] if base is not object]
    else:
        try:
            returned = typing.get_type_hints(factory).get("return")
        except (NameError, TypeError):
            returned = None
        passed_to = [returned] if inspect.isclass(returned) else []
    for network in passed_to:
        with contextlib.suppress(TypeError, ValueError):
            for name, parameter in inspect.signature(network).parameters.items():
                if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                    found.setdefault(name, parameter)
    return found


def _fill(
    kwargs: dict[str, Any], parameters: Any, names: tuple[str, ...], value: int | None
) -> None:
    """Give the network's own name of a setting ``value``, unless ``arch_args`` has it."""
    if value is None or any(name in kwargs for name in names):
        return
    for name in names:
        if name in parameters:
            kwargs[name] = value
            return
