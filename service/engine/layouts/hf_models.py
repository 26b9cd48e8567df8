"""Hugging Face transformers' image models, known by the ``PreTrainedModel`` that holds
their ``embeddings`` and by its ``config`` (``from_library``: no import of transformers
here). Those without (ResNet's ``embedder``) are CNNs, left to the default.

- **Token sequences** ``(N, prefix + h·w, C)``: the prefix is what the embeddings put
  before the patches (``cls_token``; DeiT's ``distillation_token``; DINOv2's
  ``config.num_register_tokens`` register tokens); a sequence may also be the patches
  alone (the patch embedding's). The grid is ``config.patch_size``'s at the input size
  the model runs at, rounded down as its unpadded projection does; for a hierarchical
  model (``config.depths``: Swin) the padded patch grid, halved (padded up) after each
  stage: its hidden states are ``(N, H·W, C)`` without a prefix, at one of those grids.
- 4-D outputs are ``(N, C, H, W)`` (convolutions: ResNet, ConvNeXt, the patch
  projections), except inside a ConvNeXt layer, which permutes to ``(N, H, W, C)`` for its
  ``layernorm``, ``pwconv1``, ``act``, ``grn``, ``pwconv2`` and back.

Hugging Face's layers often return a tuple whose first element is the hidden states
(``(hidden_states, attention_weights)``); ``__init__`` reads that element for any
module of theirs. A ``ModelOutput`` (what whole sub-models return) is not read: its
``last_hidden_state`` is the output of a layer inside it, which is offered.
"""

from __future__ import annotations

import math

from torch import nn

from service.engine.layouts.base import (
    Decision,
    Layout,
    Refused,
    Rule,
    Site,
    channels_last,
    from_library,
    match_tokens,
    path_to,
)

# The ConvNeXt layers' children that run channels-last, by the layer's class.
_CHANNELS_LAST_PARTS: dict[str, tuple[str, ...]] = {
    "ConvNextLayer": ("layernorm", "pwconv1", "act", "pwconv2"),
    "ConvNextV2Layer": ("layernorm", "pwconv1", "act", "grn", "pwconv2"),
}


def _is_pretrained_model(module: nn.Module) -> bool:
    return from_library(module, "transformers") and any(
        cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__
    )


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _prefix_tokens(model: nn.Module) -> int:
    """The tokens the embeddings put before the patches."""
    embeddings = getattr(model, "embeddings", None)
    count = sum(
        getattr(embeddings, name, None) is not None for name in ("cls_token", "distillation_token")
    )
    return count + int(getattr(model.config, "num_register_tokens", None) or 0)


def _grids(config: object, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The grids the model's hidden states can be on at an input of ``size``: the patch
    grid, and for a hierarchical model each stage's, halved after each (rounded down by
    strided convolutions, up by padded patch merging)."""
    patch_h, patch_w = _pair(getattr(config, "patch_size", 1))
    depths = getattr(config, "depths", None)
    if not depths:
        return [(size[0] // patch_h, size[1] // patch_w)]
    grids = []
    for rounding in (math.floor, math.ceil):
        h, w = rounding(size[0] / patch_h), rounding(size[1] / patch_w)
        for _ in depths:
            grids.append((h, w))
            h, w = rounding(h / 2), rounding(w / 2)
    return list(dict.fromkeys(grids))


def _channels_last_part(owner: nn.Module, inner: str) -> bool:
    return any(
        child in _CHANNELS_LAST_PARTS.get(type(module).__name__, ())
        for module, child in path_to(owner, inner)
    )


def pretrained_model(owner: nn.Module, inner: str, site: Site) -> Decision | None:
    # The model with the embeddings: some encoders are PreTrainedModels of their own.
    embeddings = getattr(owner, "embeddings", None)
    if not (_is_pretrained_model(owner) and isinstance(embeddings, nn.Module)):
        return None
    dim = site.output.dim()
    grids = _grids(owner.config, site.input_size)
    if _channels_last_part(owner, inner):
        if dim == 4:
            return channels_last(site, grids)
        return Refused(f"returns {site.shape_text()} inside a ConvNeXt layer's channels-last part")
    if dim == 3:
        return match_tokens(site, (_prefix_tokens(owner), 0), grids)
    if dim == 4:
        return Layout("nchw")
    return Refused(f"returns {site.shape_text()}")


RULES: tuple[Rule, ...] = (pretrained_model,)
