"""Target layers: resolve a dotted name, find a default, list the candidates.

Candidates are found by one probe forward pass with a hook on every module:
a module qualifies when it runs exactly once per forward pass and returns a
feature map: ``(N, C, H, W)``, or a transformer's tokens or channels-last map
(``layouts/``), listed with the shape of its grid. The modules whose output has room
for a map but that cannot be explained are listed too, each with the reason
(``survey_layers``; ``gradcam-service layers`` prints them).

The default of a CNN is the last candidate to run whose output still has spatial
extent (more than 1×1), i.e. the end of the feature extractor just before global
pooling; of a ``Sequential`` and its last child, which return the same tensor, the
outer one. The default of a transformer is the first LayerNorm of its last block
that holds an attention module: the normalised input of its last attention (see
``default_layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from service.contract.suggestions import close_matches, did_you_mean
from service.engine.layouts import Decision, Refused, decide_layout
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


@dataclass(frozen=True)
class RefusedLayer:
    """A module the probe ran that cannot be explained; ``reason`` follows its name
    ("layer 'x' returns ...")."""

    name: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Survey:
    """What one probe found: the candidates in execution order, and the modules whose
    output has room for a map but that cannot be explained, with the reason."""

    offered: list[LayerInfo]
    refused: list[RefusedLayer]


# Two images, not one: a layer that returns more (or fewer) rows than images, windows or
# attention heads, is then told apart from one that returns a map per image.
_PROBE_BATCH = 2


def survey_layers(model: nn.Module, channels: int, input_size: tuple[int, ...]) -> Survey:
    """Run one forward pass on blank ``(2, channels, H, W)`` images with a hook on every
    module; sort the modules into candidates and refusals (``layouts.decide_layout``), in
    execution order (a container after its children).

    Raises whatever the forward pass raises: a model that cannot take its
    configured input should fail here, at start-up.
    """
    calls: dict[str, int] = {}
    found: dict[str, LayerInfo | RefusedLayer | None] = {}
    input_shape = (_PROBE_BATCH, channels, *input_size)

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                decision = decide_layout(model, name, module, output, input_shape)
                found[name] = _listed(name, module, output, decision)

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name
    ]
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    survey = Survey([], [])
    for name, listed in found.items():
        if isinstance(listed, LayerInfo) and calls[name] > 1:
            reason = f"runs {calls[name]} times per forward pass"
            survey.refused.append(RefusedLayer(name, listed.kind, reason))
        elif isinstance(listed, LayerInfo):
            survey.offered.append(listed)
        elif listed is not None:
            survey.refused.append(listed)
    return survey


def _listed(
    name: str, module: nn.Module, output: object, decision: Decision
) -> LayerInfo | RefusedLayer | None:
    """A decision as the survey lists it; None for a refusal not worth a line."""
    kind = type(module).__name__
    if isinstance(decision, Refused):
        return RefusedLayer(name, kind, decision.reason) if decision.shown else None
    channels, *grid = decision.grid_shape(tuple(decision.map_of(output).shape))
    depth = grid.pop(0) if len(grid) == 3 else None  # a volume model's (d, h, w)
    return LayerInfo(name, kind, channels, grid[0], grid[1], decision.kind, depth)


def probe_layers(model: nn.Module, channels: int, input_size: tuple[int, ...]) -> list[LayerInfo]:
    """The candidate target layers of ``model`` in execution order (``survey_layers``)."""
    return survey_layers(model, channels, input_size).offered


def default_layer(
    candidates: list[LayerInfo], model: nn.Module, num_classes: int | None = None
) -> str | None:
    """The name of the default target layer among ``candidates`` (see module docstring).

    With ``num_classes``, maps with exactly that many channels are passed over
    when another candidate exists: they are the class score maps of a 1×1-conv
    head (SqueezeNet, CAM-style heads), not features.
    """
    modules = dict(model.named_modules())
    attention_input = _last_attention_input(candidates, modules)
    if attention_input is not None:
        return attention_input
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


def _is_attention(module: nn.Module) -> bool:
    # torch's MultiheadAttention (torchvision's ViT); torchvision's Swin, timm and
    # Hugging Face name theirs ...Attention; MONAI's ViT blocks hold an SABlock.
    name = type(module).__name__
    return (
        isinstance(module, nn.MultiheadAttention) or name.endswith("Attention") or name == "SABlock"
    )


def _last_attention_input(candidates: list[LayerInfo], modules: dict[str, nn.Module]) -> str | None:
    """For a transformer (a candidate that is tokens or channels-last): the first
    LayerNorm of the last block that holds an attention module, i.e. what its last
    attention reads (``ln_1`` of a torchvision ViT's last encoder block, ``norm1`` of a
    Swin's last block); None for a CNN, or if no block holds an attention module.

    Why there, the layer pytorch-grad-cam's documentation recommends for both: a ViT's
    head reads the class token alone, and after the last attention no token mixes with
    another, so every later layer's patch tokens have zero gradient (all-zero maps);
    the last attention's input is the last place where every patch still reaches the
    class token. A Swin averages every position into its head, so its later layers
    (``norm``) have maps too; the same place is chosen for both, as the reference does.
    """
    if all(c.layout == "nchw" for c in candidates):
        return None
    names = {c.name for c in candidates}
    last_block: str | None = None
    for c in candidates:
        if c.layout == "nchw" or not isinstance(modules[c.name], nn.LayerNorm):
            continue
        parent = c.name.rpartition(".")[0]
        if any(_is_attention(child) for child in modules[parent].children()):
            last_block = parent
    if last_block is None:
        return None
    # Registration order, not execution order: Hugging Face's ViT layer registers its
    # attention first but still names its first LayerNorm first (layernorm_before).
    for child_name, child in modules[last_block].named_children():
        name = f"{last_block}.{child_name}" if last_block else child_name
        if isinstance(child, nn.LayerNorm) and name in names:
            return name
    return None
