"""Where a layer's output keeps its feature map, and its ``(N, C, h, w)`` view.

The CAM formulas (``gradcam.py``) weigh ``(N, C, h, w)`` maps. CNN layers return
those; transformer layers do not:

- a ViT's blocks return token sequences ``(N, prefix + h·w, C)``: a class token (and
  DeiT's distillation token, DINOv2's register tokens), then one token per patch, row
  by row. The prefix has no place on the image: it is dropped and the rest reshaped to
  ``(N, C, h, w)``;
- a Swin keeps its maps channels-last, ``(N, H, W, C)`` (torchvision's, timm's; some
  CNNs' blocks too: ConvNeXt's, MaxViT's attention): permuted to ``(N, C, H, W)``. Such
  a tensor is 4-D like a CNN's, so its shape cannot tell it apart (a 7×7×768 map would
  read as 7 channels of 7×768).

So a layout is decided by the model's module types and attributes, never guessed from
a shape. "auto" walks up from the layer to the model's root; the nearest module a rule
knows decides, each rule in the module of its library:

- ``torchvision_models``: ``VisionTransformer`` and ``SwinTransformer``, by type;
- ``timm_models``: timm's token models (``patch_embed``, ``num_prefix_tokens``),
  channels-last models (``output_fmt``) and the channels-last parts of its blocks;
- ``hf_models``: a Hugging Face ``PreTrainedModel``, from its ``config`` and embeddings.

A layer no rule claims is ``(N, C, H, W)`` if it is 4-D, as before transformers were
explained, so a CNN's maps are computed exactly as before. Whatever the rule, a tensor
whose first dimension is not the batch (windows of a Swin, attention heads) is no
image's map, and a token count must tile the model's own grid at the input size the
model runs at; otherwise the layer is refused, with the reason (``Refused``), which
``gradcam-service layers`` prints.

A model that "auto" does not know declares one layout for the whole model in the
models file (``layout``, ``prefix_tokens``, ``declared.py``); it overrides "auto".
``declare_layout`` keeps it on the model's root module, as ``folding.py`` keeps a
folded convolution's batch norm on it, so every engine built on the module (the tuning
probes, the CUDA graphs) reads the same layout.

The activation and its gradient go through the same view (a slice and a
permutation: the prefix tokens' gradient is dropped with them), so every CAM formula
works on the grid unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, ValuesView
from dataclasses import replace

from torch import Tensor, nn

from service.engine.layouts import hf_models, timm_models, torchvision_models
from service.engine.layouts.base import (
    Decision,
    Layout,
    Refused,
    Rule,
    Site,
    from_library,
    token_grid,
)
from service.engine.layouts.declared import decide_declared, declare_layout, declared_layout

__all__ = ["Decision", "Layout", "Refused", "decide_layout", "declare_layout", "token_grid"]

# Layers whose 3-D outputs are channels first, (N, C, L): a Swin's pooler reads its
# tokens transposed, and C might happen to be the grid's h·w.
_ONE_D = (nn.Conv1d, nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)

_RULES: tuple[Rule, ...] = (
    *torchvision_models.RULES,
    *timm_models.RULES,
    *hf_models.RULES,
)


def decide_layout(
    model: nn.Module, name: str, module: nn.Module, output: object, input_shape: tuple[int, ...]
) -> Decision:
    """How ``output``, which module ``name`` of ``model`` returned for an input of
    ``input_shape`` ``(N, C, H, W)``, holds its map; or why it holds none."""
    tensor, in_tuple = _map_tensor(module, output)
    if tensor is None:
        return Refused(f"returns {_describe(output)}, not a tensor", shown=_holds_maps(output))
    site = Site(module, tensor, tuple(input_shape))
    if tensor.dim() < 3:
        return Refused(
            f"returns {site.shape_text()}, not an (N, C, H, W) feature map "
            "or a transformer's tokens",
            shown=False,
        )
    if tensor.shape[0] != input_shape[0]:
        return Refused(
            f"returns {tuple(tensor.shape)} for {input_shape[0]} images: windows or heads, "
            "not one map per image"
        )
    if tensor.dim() == 3 and isinstance(site.module, _ONE_D):
        return Refused(f"returns {site.shape_text()}: a 1-D layer's (N, C, L), not tokens")
    if len(input_shape) == 5:
        return _volume_layout(site)
    declared = declared_layout(model)
    decision = decide_declared(declared, site) if declared else _by_rules(model, name, site)
    if isinstance(decision, Layout) and in_tuple:
        return replace(decision, first_of_tuple=True)
    return decision


def _volume_layout(site: Site) -> Decision:
    """A volume model's layer: its map is ``(N, C, D, H, W)``, as a 3-D CNN returns it."""
    if site.output.dim() == 5:
        return Layout("ncdhw")
    return Refused(
        f"returns {site.shape_text()}: a volume model's map is (N, C, D, H, W)",
        shown=site.output.dim() > 2,
    )


def _map_tensor(module: nn.Module, output: object) -> tuple[Tensor | None, bool]:
    """The tensor that may hold the map: the output itself, or the first element of a
    Hugging Face layer's tuple (their convention; another library's tuple, such as
    ``nn.MultiheadAttention``'s, is not read)."""
    if isinstance(output, Tensor):
        return output, False
    if (
        type(output) is tuple
        and output
        and isinstance(output[0], Tensor)
        and from_library(module, "transformers")
    ):
        return output[0], True
    return None, False


def _describe(output: object) -> str:
    if isinstance(output, tuple):
        return f"a {type(output).__name__} of {len(output)}"
    return "None" if output is None else f"a {type(output).__name__}"


def _holds_maps(output: object) -> bool:
    """Whether a non-tensor output carries a tensor with room for a map (worth saying why
    it is not read), as a tuple or a ``ModelOutput`` (a dict) does."""
    values = output.values() if isinstance(output, dict) else output
    if not isinstance(values, tuple | list | ValuesView):
        return False
    return any(isinstance(v, Tensor) and v.dim() >= 3 for v in values)


def _ancestors(model: nn.Module, name: str) -> Iterator[tuple[nn.Module, str]]:
    """Each module above ``name``, nearest first, with ``name``'s path inside it."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        yield (model.get_submodule(prefix) if prefix else model), ".".join(parts[depth:])


def _by_rules(model: nn.Module, name: str, site: Site) -> Decision:
    for owner, inner in _ancestors(model, name):
        for rule in _RULES:
            decision = rule(owner, inner, site)
            if decision is not None:
                return decision
    if site.output.dim() == 4:
        return Layout("nchw")
    if site.output.dim() == 3:
        return Refused(
            f"returns {site.shape_text()}: 'auto' knows no token layout for this model "
            '(declare layout = "tokens" in the models file)'
        )
    return Refused(f"returns {site.shape_text()}, a {site.output.dim()}-D tensor")
