"""Load a model described by a ``ModelSpec``: architecture, weights, labels, layer.

Every mistake becomes a ``ConfigError`` that names the model and the key, raised
at start-up: unknown arch, missing or corrupt weights, weights that do not fit,
labels that do not match the outputs, an unknown layer, an input the model
cannot take.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from service.contract.errors import ConfigError
from service.contract.settings import ModelsFile, ModelSpec
from service.engine.checkpoints import CheckpointError, check_shapes, fit_keys, read_checkpoint
from service.engine.layers import UnknownLayerError, default_layer, probe_layers, resolve_layer
from service.transport.interface import LayerInfo, ModelInfo

logger = logging.getLogger(__name__)

# ImageNet statistics: the default normalisation of a 3-channel model, and their
# averages for a 1-channel one, unless the spec or the torchvision weights say otherwise.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadedModel:
    """A ready model: eval mode, frozen parameters, on ``device``."""

    name: str
    spec: ModelSpec
    module: nn.Module
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_layer: str
    layers: tuple[LayerInfo, ...]
    device: torch.device
    load_seconds: float

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.spec.channels

    @property
    def input_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        return self.spec.input_size

    def info(self) -> ModelInfo:
        """What the HTTP side needs to know of this model (no weights, no torch)."""
        return ModelInfo(
            name=self.name,
            arch=self.spec.arch,
            labels=self.labels,
            multilabel=self.spec.multilabel,
            channels=self.channels,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            resize=self.spec.resize,
            default_layer=self.default_layer,
            layers=self.layers,
            modules=tuple(name for name, _ in self.module.named_modules() if name),
            device=str(self.device),
        )


class _ModelConfigError(ConfigError):
    def __init__(self, model: str, key: str, message: str) -> None:
        super().__init__(f"model '{model}', key '{key}': {message}")


def _import_factory(name: str, spec: ModelSpec, base_dir: Path) -> Any:
    """``pkg.module:factory``, found next to the models file first, then on ``sys.path``
    (no ``PYTHONPATH`` needed for code shipped with the models file, in a container too)."""
    module_name, _, factory_name = spec.arch.partition(":")
    folder = str(base_dir.resolve())
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        return getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise _ModelConfigError(
            name,
            "arch",
            f"cannot import '{spec.arch}' (looked in {folder} and on sys.path): {error}",
        ) from None
    finally:
        if added:
            sys.path.remove(folder)


def _build_architecture(
    name: str, spec: ModelSpec, num_classes: int | None, base_dir: Path
) -> nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if ":" in spec.arch:
        factory = _import_factory(name, spec, base_dir)
        try:
            model = factory(**kwargs)
        except Exception as error:
            raise _ModelConfigError(
                name, "arch", f"'{spec.arch}'({kwargs}) failed: {error}"
            ) from None
        if not isinstance(model, nn.Module):
            raise _ModelConfigError(
                name, "arch", f"'{spec.arch}' returned {type(model).__name__}, not a torch module"
            )
        return model
    available = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in available:
        raise _ModelConfigError(
            name,
            "arch",
            f"unknown architecture '{spec.arch}'. torchvision classification models "
            f"are: {', '.join(sorted(available))}; or give 'package.module:factory'",
        )
    try:
        return torchvision.models.get_model(spec.arch, weights=None, **kwargs)
    except (TypeError, ValueError) as error:
        raise _ModelConfigError(name, "arch", f"cannot build '{spec.arch}': {error}") from None


def _torchvision_weights(name: str, spec: ModelSpec, models: ModelsFile) -> Any | None:
    """The torchvision weights enum member named by ``spec.weights``, if it is one (a
    file of that name, whatever its extension, is a file)."""
    if (
        spec.weights is None
        or ":" in spec.arch
        or _looks_like_path(spec.weights)
        or models.resolve_path(spec.weights).exists()
    ):
        return None
    try:
        enum = torchvision.models.get_model_weights(spec.arch)
    except (KeyError, ValueError):
        return None
    member = spec.weights.split(".")[-1]
    if member == "DEFAULT":
        return enum.DEFAULT
    if member in enum.__members__:
        return enum[member]
    raise _ModelConfigError(
        name,
        "weights",
        f"'{spec.weights}' is neither a file nor a weights name of "
        f"{spec.arch}: {', '.join(enum.__members__)}",
    )


# Extensions checkpoints are shared with (the content decides how a file is read).
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".safetensors", ".bin", ".pkl")


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(_CHECKPOINT_SUFFIXES) or "/" in value or "\\" in value


def _download_state_dict(name: str, spec: ModelSpec, weights: Any) -> dict[str, Tensor]:
    try:
        state: dict[str, Tensor] = weights.get_state_dict(progress=False, check_hash=True)
        return state
    except (OSError, RuntimeError) as error:
        # URLError is an OSError; torch.hub raises RuntimeError on a bad hash.
        raise _ModelConfigError(
            name,
            "weights",
            f"could not download torchvision weights {spec.arch} {weights.name} from "
            f"{weights.url} ({error}). Without internet access, download that file on a "
            'machine that has it and give its path: weights = "/path/to/file.pth" '
            "(or copy it into torch's hub cache, $TORCH_HOME/hub/checkpoints/)",
        ) from None


def _read_state_dict(name: str, path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise _ModelConfigError(name, "weights", f"file {path} does not exist")
    try:
        return read_checkpoint(path)
    except CheckpointError as error:
        raise _ModelConfigError(name, "weights", str(error)) from None


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name, module
    return None


def _adapt_input_channels(model: nn.Module, channels: int) -> None:
    """Give a torchvision model ``channels`` input channels by rebuilding its first conv."""
    found = _first_conv(model)
    if found is None or found[1].in_channels == channels:
        return
    path, conv = found
    replacement = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, replacement)


def _fit_first_conv(model: nn.Module, state: dict[str, Tensor], channels: int) -> None:
    """Fold 3-channel pretrained weights into a 1-channel first conv (sum over RGB)."""
    found = _first_conv(model)
    if found is None:
        return
    key = f"{found[0]}.weight"
    weight = state.get(key)
    if weight is not None and weight.dim() == 4 and weight.shape[1] == 3 and channels == 1:
        state[key] = weight.sum(dim=1, keepdim=True)


def _load_weights(
    name: str, model: nn.Module, state: dict[str, Tensor], source: str, channels: int
) -> None:
    expected = model.state_dict()
    try:
        fitted = fit_keys(state, expected)
        state = fitted.state
        _fit_first_conv(model, state, channels)
        check_shapes(state, expected)
    except CheckpointError as error:
        raise _ModelConfigError(
            name, "weights", f"{source} does not fit the architecture: {error}"
        ) from None
    if fitted.change:
        logger.info(
            "model '%s': %s of every key of %s to fit the architecture", name, fitted.change, source
        )
    try:
        result = model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch lists every missing/unexpected key and shape mismatch; keep the first lines.
        detail = "; ".join(line.strip() for line in str(error).splitlines()[1:6] if line.strip())
        raise _ModelConfigError(
            name, "weights", f"{source} does not fit the architecture: {detail}"
        ) from None
    del result


def _read_labels(
    name: str, spec: ModelSpec, models: ModelsFile, weights: Any | None
) -> tuple[str, ...] | None:
    if spec.labels is not None:
        path = models.resolve_path(spec.labels)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise _ModelConfigError(name, "labels", f"cannot read {path}: {error}") from None
        labels = tuple(line.strip() for line in lines if line.strip())
        if not labels:
            raise _ModelConfigError(name, "labels", f"{path} has no labels")
        if len(set(labels)) != len(labels):
            raise _ModelConfigError(name, "labels", f"{path} repeats a label")
        return labels
    if weights is not None and "categories" in weights.meta:
        return tuple(weights.meta["categories"])
    return None


# Heads that turn logits into probabilities, as modules (a hook can read their input).
_ACTIVATIONS = (nn.Sigmoid, nn.Softmax)
# Probabilities turned back into logits (a functional activation): kept off 0 and 1.
_EPS = 1e-7


def _final_activation(model: nn.Module, inputs: Tensor) -> tuple[tuple[str, nn.Module] | None, Any]:
    """One forward pass on ``inputs``: the Sigmoid or Softmax module whose output is the
    model's output, if there is one, and that output (None if the forward failed)."""
    seen: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, key=module_name: seen.__setitem__(key, out)
        )
        for module_name, module in model.named_modules()
        if isinstance(module, _ACTIVATIONS)
    ]
    try:
        with torch.no_grad():
            out = model(inputs)
    except Exception:
        return None, None  # _output_classes reports a forward that fails
    finally:
        for handle in handles:
            handle.remove()
    for module_name, value in seen.items():
        if value is out:
            return (module_name, model.get_submodule(module_name)), out
    return None, out


def _return_input(_module: nn.Module, inputs: tuple[Any, ...], _output: Tensor) -> Tensor:
    result: Tensor = inputs[0]
    return result


def _inverse_sigmoid(_module: nn.Module, _inputs: tuple[Any, ...], output: Tensor) -> Tensor:
    return torch.logit(output, eps=_EPS)


def _log_probabilities(_module: nn.Module, _inputs: tuple[Any, ...], output: Tensor) -> Tensor:
    return torch.log(output.clamp_min(_EPS))


def _expose_logits(name: str, model: nn.Module, spec: ModelSpec) -> None:
    """Make a model that returns probabilities return the logits they come from, so
    Grad-CAM's score is taken before the activation and the service applies it once."""
    final, _ = _final_activation(model, torch.zeros(1, spec.channels, *spec.input_size))
    if final is not None:
        module_name, module = final
        module.register_forward_hook(_return_input)
        kind = type(module).__name__
        logger.info(
            "model '%s': output = \"probabilities\": scores from the input of its final %s ('%s')",
            name,
            kind,
            module_name,
        )
        if (kind == "Softmax") == spec.multilabel:
            logger.warning(
                "model '%s' ends in a %s but multilabel = %s: check 'multilabel' "
                "(true for independent sigmoid scores)",
                name,
                kind,
                str(spec.multilabel).lower(),
            )
        return
    # A functional sigmoid/softmax in forward(): no module to read before; undo it.
    model.register_forward_hook(_inverse_sigmoid if spec.multilabel else _log_probabilities)
    logger.warning(
        "model '%s': output = \"probabilities\" but no final Sigmoid/Softmax module was found; "
        "its outputs are turned back into %s, and saturated scores (exactly 0 or 1) give no "
        "gradient. A model that returns logits (or ends in an nn.Sigmoid/nn.Softmax module) "
        "avoids this",
        name,
        "log-odds" if spec.multilabel else "log-probabilities",
    )


def _warn_if_probabilities(name: str, model: nn.Module, spec: ModelSpec) -> None:
    """A model declared to return logits whose outputs look like probabilities would get
    a second sigmoid/softmax (every score squeezed near 0.5–0.73): say so at load."""
    generator = torch.Generator().manual_seed(0)
    probes = torch.cat(
        [
            torch.zeros(1, spec.channels, *spec.input_size),
            torch.full((1, spec.channels, *spec.input_size), 0.5),
            torch.randn(2, spec.channels, *spec.input_size, generator=generator),
        ]
    )
    final, out = _final_activation(model, probes)
    if final is not None:
        logger.warning(
            "model '%s' ends in a %s module ('%s'): its outputs are probabilities. "
            'Set output = "probabilities" in the models file, or every score gets a '
            "second %s",
            name,
            type(final[1]).__name__,
            final[0],
            "sigmoid" if spec.multilabel else "softmax",
        )
        return
    if isinstance(out, Tensor) and out.numel() and bool(((out >= 0) & (out <= 1)).all()):
        logger.warning(
            "model '%s': its outputs on test inputs all lie in [0, 1], as "
            "probabilities do. If it returns probabilities, set output = "
            '"probabilities" in the models file (else each score gets a second %s)',
            name,
            "sigmoid" if spec.multilabel else "softmax",
        )


def _output_classes(name: str, model: nn.Module, spec: ModelSpec) -> int:
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, spec.channels, *spec.input_size))
    except Exception as error:
        raise _ModelConfigError(
            name,
            "input_size",
            f"a forward pass on a (1, {spec.channels}, "
            f"{spec.input_size[0]}, {spec.input_size[1]}) input failed ({error}); check "
            "'channels' and 'input_size'",
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise _ModelConfigError(name, "arch", "the model's output is not an (N, classes) tensor")
    return int(out.shape[1])


def load_model(name: str, models: ModelsFile, device: torch.device | str = "cpu") -> LoadedModel:
    """Build, load and check model ``name`` of ``models``; ``ConfigError`` on any mistake."""
    started = time.monotonic()
    spec = models.models[name]
    weights_enum = _torchvision_weights(name, spec, models)
    labels = _read_labels(name, spec, models, weights_enum)
    num_classes = spec.num_classes
    if num_classes is None and labels is not None:
        num_classes = len(labels)
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise _ModelConfigError(
            name, "labels", f"{len(labels)} labels but num_classes = {num_classes}"
        )

    model = _build_architecture(name, spec, num_classes, models.base_dir)
    if ":" not in spec.arch:
        _adapt_input_channels(model, spec.channels)
    if weights_enum is not None:
        state = _download_state_dict(name, spec, weights_enum)
        _load_weights(name, model, state, f"torchvision weights {weights_enum.name}", spec.channels)
    elif spec.weights is not None:
        path = models.resolve_path(spec.weights)
        _load_weights(name, model, _read_state_dict(name, path), str(path), spec.channels)
    else:
        logger.warning("model '%s' has no weights: its parameters are random", name)

    model.eval()
    model.requires_grad_(False)
    if spec.output == "probabilities":
        _expose_logits(name, model, spec)
    else:
        _warn_if_probabilities(name, model, spec)
    classes = _output_classes(name, model, spec)
    if num_classes is not None and classes != num_classes:
        raise _ModelConfigError(
            name, "num_classes", f"the model has {classes} outputs, not {num_classes}"
        )
    if labels is None:
        labels = tuple(str(i) for i in range(classes))

    layers = tuple(probe_layers(model, spec.channels, spec.input_size))
    if spec.layer is not None:
        try:
            resolve_layer(model, spec.layer)
        except UnknownLayerError as error:
            raise _ModelConfigError(name, "layer", str(error)) from None
        if spec.layer not in {layer.name for layer in layers}:
            raise _ModelConfigError(
                name,
                "layer",
                f"layer '{spec.layer}' does not return an (N, C, H, W) feature "
                "map exactly once per forward pass",
            )
        layer = spec.layer
    else:
        found = default_layer(list(layers), model, classes)
        if found is None:
            raise _ModelConfigError(
                name, "layer", "no layer returns a spatial feature map; name one with 'layer'"
            )
        layer = found
        info = next(x for x in layers if x.name == layer)
        logger.info(
            "model '%s': default target layer '%s' (%s, %d×%d×%d)",
            name,
            layer,
            info.kind,
            info.channels,
            info.height,
            info.width,
        )

    mean, std = _normalisation(spec, weights_enum)
    torch_device = torch.device(device)
    model.to(torch_device)
    return LoadedModel(
        name=name,
        spec=spec,
        module=model,
        labels=labels,
        mean=mean,
        std=std,
        default_layer=layer,
        layers=layers,
        device=torch_device,
        load_seconds=time.monotonic() - started,
    )


def _normalisation(
    spec: ModelSpec, weights: Any | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean: tuple[float, ...] = _IMAGENET_MEAN
    std: tuple[float, ...] = _IMAGENET_STD
    if weights is not None:
        transform = weights.transforms()
        mean = tuple(getattr(transform, "mean", mean))
        std = tuple(getattr(transform, "std", std))
    if spec.channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return (
        tuple(float(v) for v in spec.mean) if spec.mean is not None else mean,
        tuple(float(v) for v in spec.std) if spec.std is not None else std,
    )
