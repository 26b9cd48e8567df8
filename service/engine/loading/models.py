"""Load a model described by a ``ModelSpec``: architecture, weights, labels, layer.

Every mistake becomes a ``ConfigError`` that names the model and the key, raised
at start-up: unknown arch, missing or corrupt weights, weights that do not fit,
labels that do not match the outputs, an unknown layer, an input the model
cannot take.

This module runs the steps in order and keeps what the models file adds itself
(labels, normalisation, the target layer); the steps with more to them are their
own modules: ``architecture`` (build the module), ``weights`` (find, read and fit
the weights), ``outputs`` (logits or probabilities, how many).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from service.contract.models_file import ModelsFile, ModelSpec
from service.engine.layers import UnknownLayerError, default_layer, probe_layers, resolve_layer
from service.engine.layouts import declare_layout
from service.engine.loading import libraries
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.outputs import (
    expose_logits,
    output_classes,
    pick_logits,
    warn_if_probabilities,
)
from service.engine.loading.preprocessing import Preprocessing, resolve
from service.engine.loading.weights import (
    download_state_dict,
    load_weights,
    read_state_dict,
    torchvision_weights,
)
from service.transport.interface import LayerInfo, ModelInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A ready model: eval mode, frozen parameters, on ``device``; its input as resolved
    (``preprocessing``: the file's values, else its library's, else the defaults)."""

    name: str
    spec: ModelSpec
    module: nn.Module
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    default_layer: str
    layers: tuple[LayerInfo, ...]
    device: torch.device
    load_seconds: float
    multilabel: bool = False
    random_weights: bool = False  # none were given or built in: its answers mean nothing

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    @property
    def input_size(self) -> tuple[int, ...]:
        """``(height, width)`` of the model input; a volume model's ``(D, H, W)``."""
        return self.preprocessing.input_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    def info(self) -> ModelInfo:
        """What the HTTP side needs to know of this model (no weights, no torch)."""
        shape = self.preprocessing
        return ModelInfo(
            name=self.name,
            arch=self.spec.arch,
            labels=self.labels,
            multilabel=self.multilabel,
            channels=shape.channels,
            input_size=shape.input_size,
            mean=shape.mean,
            std=shape.std,
            resize=shape.resize,
            default_layer=self.default_layer,
            layers=self.layers,
            modules=tuple(name for name, _ in self.module.named_modules() if name),
            device=str(self.device),
            codes={
                label: (code.scheme, code.value, code.meaning)
                for label, code in self.spec.codes.items()
            },
            scale_size=shape.scale_size,
            crop_pct=shape.crop_pct,
            interpolation=shape.interpolation,
            crop_offset=shape.crop_offset,
            channel_order=shape.channel_order,
            modalities=self.spec.modalities,
            body_parts=self.spec.body_parts,
            random_weights=self.random_weights,
            sources=dict(shape.sources),
            library=self.spec.library,
            orientation=shape.volume.orientation if shape.volume else None,
            spacing=shape.volume.spacing if shape.volume else None,
            window=shape.volume.window if shape.volume else None,
        )


def _read_labels(name: str, spec: ModelSpec, models: ModelsFile) -> tuple[str, ...] | None:
    """The models file's labels file, if it names one."""
    if spec.labels is not None:
        path = models.resolve_path(spec.labels)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ModelConfigError(name, "labels", f"cannot read {path}: {error}") from None
        labels = tuple(line.strip() for line in lines if line.strip())
        if not labels:
            raise ModelConfigError(name, "labels", f"{path} has no labels")
        if len(set(labels)) != len(labels):
            raise ModelConfigError(name, "labels", f"{path} repeats a label")
        return labels
    return None


def _torchvision_class_names(name: str, spec: ModelSpec, classes: int) -> tuple[str, ...] | None:
    """For a torchvision architecture whose weights came from a file without labels: the
    class names torchvision ships with its weights' metadata (offline, no download), if
    the model has as many outputs as they have names (ImageNet's 1000, say)."""
    if ":" in spec.arch:
        return None
    import torchvision  # ~0.8 s (it imports torch._dynamo): only for its own models

    try:
        members = list(torchvision.models.get_model_weights(spec.arch))
    except (KeyError, ValueError):
        return None
    for member in members:
        names = member.meta.get("categories")
        if names and len(names) == classes:
            logger.info(
                "model '%s': class names from torchvision's %s metadata (%d classes; a "
                "labels file overrides them)",
                name,
                member,
                classes,
            )
            return tuple(names)
    return None


def load_model(name: str, models: ModelsFile, device: torch.device | str = "cpu") -> LoadedModel:
    """Build, load and check model ``name`` of ``models``; ``ConfigError`` on any mistake.

    The steps in order, each a function: labels and class count from the file, the
    module from its library with its weights, its input as resolved, its outputs, the
    labels it ends with, its target layer.
    """
    started = time.monotonic()
    spec = models.models[name]
    labels = _read_labels(name, spec, models)
    built = libraries.build(name, spec, _declared_classes(name, spec, labels), models)
    model = built.module
    declare_layout(model, spec.layout, spec.prefix_tokens)
    shape = resolve(spec, built.config)
    random_weights = False
    if not built.weights_loaded:
        random_weights = not _load_model_weights(name, spec, models, model, shape.channels)
    multilabel = spec.multilabel if spec.given("multilabel") else bool(built.multilabel)
    classes = _freeze_and_count_outputs(name, spec, model, shape, multilabel)
    labels = _final_labels(name, spec, labels or built.labels, classes)
    layers = tuple(probe_layers(model, shape.channels, shape.input_size))
    layer = _target_layer(name, spec, model, layers, classes)
    torch_device = torch.device(device)
    model.to(torch_device)
    if built.place is not None:
        built.place(model, torch_device)
    return LoadedModel(
        name=name,
        spec=spec,
        module=model,
        labels=labels,
        preprocessing=shape,
        default_layer=layer,
        layers=layers,
        device=torch_device,
        load_seconds=time.monotonic() - started,
        multilabel=multilabel,
        random_weights=random_weights,
    )


def _declared_classes(name: str, spec: ModelSpec, labels: tuple[str, ...] | None) -> int | None:
    """The class count the models file declares: ``num_classes``, else the number of
    labels, else None (the model's outputs will tell); the two must agree."""
    num_classes = spec.num_classes
    if num_classes is None and labels is not None:
        num_classes = len(labels)
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise ModelConfigError(
            name, "labels", f"{len(labels)} labels but num_classes = {num_classes}"
        )
    return num_classes


def _load_model_weights(
    name: str, spec: ModelSpec, models: ModelsFile, model: nn.Module, channels: int
) -> bool:
    """Fit ``model`` with torchvision's named weights or the file's (True); none leaves it
    random (False)."""
    weights_enum = (
        torchvision_weights(name, spec, models) if spec.library == "torchvision" else None
    )
    if weights_enum is not None:
        state = download_state_dict(name, spec, weights_enum)
        load_weights(name, model, state, f"torchvision weights {weights_enum.name}", channels)
        return True
    if spec.weights is not None:
        path = models.resolve_path(spec.weights)
        state = read_state_dict(name, path, spec.weights)
        load_weights(name, model, state, str(path), channels, spec)
        return True
    logger.warning(
        "model '%s' has no weights: its parameters are random, and every answer says so", name
    )
    return False


def _freeze_and_count_outputs(
    name: str, spec: ModelSpec, model: nn.Module, shape: Preprocessing, multilabel: bool
) -> int:
    """Put ``model`` in eval mode with frozen parameters, make it answer logits, and
    return how many classes it has: as many as declared, if any were."""
    model.eval()
    model.requires_grad_(False)
    pick_logits(name, model, shape, spec.logits)
    if spec.output == "probabilities":
        expose_logits(name, model, shape, multilabel)
    else:
        warn_if_probabilities(name, model, shape, multilabel)
    classes = output_classes(name, model, shape)
    declared = spec.num_classes
    if declared is not None and classes != declared:
        raise ModelConfigError(
            name, "num_classes", f"the model has {classes} outputs, not {declared}"
        )
    return classes


def _final_labels(
    name: str, spec: ModelSpec, labels: tuple[str, ...] | None, classes: int
) -> tuple[str, ...]:
    """The model's labels: the file's, else torchvision's class names, else the class
    numbers; every label the file gives a code must be one of them."""
    if labels is None and spec.library == "torchvision":
        labels = _torchvision_class_names(name, spec, classes)
    if labels is not None and len(labels) != classes:
        raise ModelConfigError(
            name, "labels", f"{len(labels)} labels for the model's {classes} outputs"
        )
    if labels is None:
        labels = tuple(str(i) for i in range(classes))
    unknown = [label for label in spec.codes if label not in labels]
    if unknown:
        raise ModelConfigError(
            name,
            "codes",
            f"{', '.join(map(repr, unknown))} is not one of the model's labels "
            f"({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})",
        )
    return labels


def _target_layer(
    name: str, spec: ModelSpec, model: nn.Module, layers: tuple[LayerInfo, ...], classes: int
) -> str:
    """The layer explained by default: the file's ``layer`` if it is one of ``layers``
    (the probe's), else the one ``default_layer`` picks."""
    if spec.layer is not None:
        return _named_layer(name, spec.layer, model, layers)
    found = default_layer(list(layers), model, classes)
    if found is None:
        raise ModelConfigError(
            name,
            "layer",
            "no layer returns a spatial feature map; name one with 'layer' (and "
            "'layout' if the model is a transformer, see docs/models.md)",
        )
    info = next(x for x in layers if x.name == found)
    logger.info(
        "model '%s': default target layer '%s' (%s, %d×%d×%d, %s)",
        name,
        found,
        info.kind,
        info.channels,
        info.height,
        info.width,
        info.layout,
    )
    return found


def _named_layer(name: str, layer: str, model: nn.Module, layers: tuple[LayerInfo, ...]) -> str:
    """``layer`` as the models file names it, if ``model`` has it and the probe listed it."""
    try:
        resolve_layer(model, layer)
    except UnknownLayerError as error:
        raise ModelConfigError(name, "layer", str(error)) from None
    if layer not in {info.name for info in layers}:
        raise ModelConfigError(
            name,
            "layer",
            f"layer '{layer}' does not return a feature map (N, C, H, W), or "
            "a transformer's tokens, exactly once per forward pass",
        )
    return layer
