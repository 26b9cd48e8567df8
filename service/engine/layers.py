"""Target layers: resolve a dotted name, find a default, list the candidates.

Candidates are found by one probe forward pass with a hook on every module:
a module qualifies when it runs exactly once per forward pass and returns a
``(N, C, H, W)`` tensor. The default is the last one to run whose output still
has spatial extent (more than 1×1), i.e. the end of the feature extractor just
before global pooling; of a ``Sequential`` and its last child, which return the
same tensor, the outer one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from service.contract.suggestions import close_matches, did_you_mean
from service.transport.interface import LayerInfo

# Pooling modules whose output only resamples their input: never a default.
_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class UnknownLayerError(LookupError):
    """No module of that name; the message suggests the closest names."""


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` (dotted, as ``model.named_modules()`` spells it)."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = close_matches(name, [n for n in modules if n])
    raise UnknownLayerError(f"the model has no layer '{name}'.{did_you_mean(close)}")


def probe_layers(model: nn.Module, channels: int, input_size: tuple[int, int]) -> list[LayerInfo]:
    """Run one forward pass on a blank ``(1, channels, H, W)`` image; return the candidates
    in execution order (a container after its children).

    Raises whatever the forward pass raises: a model that cannot take its
    configured input should fail here, at start-up.
    """
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                if isinstance(output, Tensor) and output.dim() == 4:
                    shapes[name] = tuple(output.shape[1:])

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(1, channels, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()

    modules = dict(model.named_modules())
    return [
        LayerInfo(name, type(modules[name]).__name__, *shapes[name])
        for name in order
        if name in shapes and calls[name] == 1
    ]


def default_layer(
    candidates: list[LayerInfo], model: nn.Module, num_classes: int | None = None
) -> str | None:
    """The name of the default target layer among ``candidates`` (see module docstring).

    With ``num_classes``, maps with exactly that many channels are passed over
    when another candidate exists: they are the class score maps of a 1×1-conv
    head (SqueezeNet, CAM-style heads), not features.
    """
    modules = dict(model.named_modules())
    spatial = [
        c
        for c in candidates
        if (c.height > 1 or c.width > 1) and not isinstance(modules[c.name], _POOLING)
    ]
    features = [c for c in spatial if c.channels != num_classes]
    spatial = features or spatial
    if not spatial:
        return None
    # Hooks fire children first, so the last candidate to run is the outermost
    # module ending there: ``layer4`` rather than ``layer4.1``.
    return spatial[-1].name
