"""Build the ``nn.Module`` a model's ``arch`` names, before any weights are loaded.

``arch`` is a torchvision classification model's name or ``package.module:factory``
(imported from next to the models file first); a torchvision model gets the
input channels of its spec by a rebuilt first convolution. Every mistake is a
``ModelConfigError`` on the ``arch`` key.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from torch import nn

from service.contract.models_file import ModelSpec
from service.engine.loading.errors import ModelConfigError


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
        raise ModelConfigError(
            name,
            "arch",
            f"cannot import '{spec.arch}' (looked in {folder} and on sys.path): {error}",
        ) from None
    finally:
        if added:
            sys.path.remove(folder)


def build_architecture(
    name: str, spec: ModelSpec, num_classes: int | None, base_dir: Path
) -> nn.Module:
    """The untrained module ``spec.arch`` names, with ``num_classes`` outputs if given."""
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if ":" in spec.arch:
        factory = _import_factory(name, spec, base_dir)
        try:
            model = factory(**kwargs)
        except Exception as error:
            raise ModelConfigError(
                name, "arch", f"'{spec.arch}'({kwargs}) failed: {error}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ModelConfigError(
                name, "arch", f"'{spec.arch}' returned {type(model).__name__}, not a torch module"
            )
        return model
    import torchvision  # ~0.8 s (it imports torch._dynamo): only for its own models

    available = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in available:
        elsewhere = _in_timm(spec.arch)
        raise ModelConfigError(
            name,
            "arch",
            f"unknown architecture '{spec.arch}'{elsewhere}. torchvision classification "
            f"models are: {', '.join(sorted(available))}; or give 'package.module:factory'",
        )
    try:
        return torchvision.models.get_model(spec.arch, weights=None, **kwargs)
    except (TypeError, ValueError) as error:
        raise ModelConfigError(name, "arch", f"cannot build '{spec.arch}': {error}") from None


def _in_timm(arch: str) -> str:
    """ "; timm has a model of that name: library = "timm"" where it has (timm installed)."""
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        return ""
    return '; timm has a model of that name: library = "timm"' if timm.is_model(arch) else ""


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``Conv2d`` the model registers, with its dotted name (None without one)."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name, module
    return None


def adapt_input_channels(model: nn.Module, channels: int) -> None:
    """Give a torchvision model ``channels`` input channels by rebuilding its first conv."""
    found = first_conv(model)
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
