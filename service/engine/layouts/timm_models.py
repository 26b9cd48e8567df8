"""timm's models, known by the attributes timm gives them (``from_library``: a class
defined in ``timm``, no import of timm here).

- **Token models**, a ``patch_embed`` and ``num_prefix_tokens``: ``VisionTransformer``
  and what derives from it or copies its shape (DeiT's distilled models: class and
  distillation token; DINOv2 with registers: 1 + 4; BEiT, EVA; the hybrids, whose
  ``patch_embed`` is a CNN backbone). Their blocks return ``(N, prefix + h·w, C)`` and
  the patch embedding ``(N, h·w, C)`` (or ``(N, h, w, C)`` with ``dynamic_img_size``,
  as its ``output_fmt`` says); ``(h, w)`` is the patch embedding's own grid at the size
  the model runs at (``grid_size``, or ``dynamic_feat_size`` at another size). Their
  other 4-D outputs are per-head attention tensors ``(N, heads, tokens, dim)``: refused.
- **Channels-last models**, ``output_fmt == "NHWC"`` (Swin, Swin V2, MambaOut...):
  every 4-D output but a convolution's is ``(N, H, W, C)``, and the ``(N, H·W, C)``
  tokens inside their blocks (Swin's MLP) are on a grid of one of their stages (the
  reductions ``feature_info`` lists, at the input size).
- **Channels-last parts of NCHW models** (``feature_info``, no ``output_fmt``): a
  MaxViT block's partitioned attentions (``nchw_attn`` false), a parallel MaxViT block's
  ``attn``, a ConvNeXt block's ``norm`` and ``mlp`` (``use_conv_mlp`` false: timm's
  ConvNeXt and MaxViT's ConvNeXt blocks) permute to ``(N, H, W, C)`` and back; the rest
  of these models (CoAtNet's stages, the MBConv blocks, the stems) is ``(N, C, H, W)``.

An ``(N, H, W, C)`` output must be on one of the stage grids: inside a window
attention that covers the whole map, ``(N, heads, tokens, tokens)`` is 4-D too.
"""

from __future__ import annotations

from torch import nn

from service.engine.layouts.base import (
    Decision,
    Layout,
    Refused,
    Rule,
    Site,
    channels_last,
    floor_and_ceil_grids,
    from_library,
    match_tokens,
    path_to,
)

# Block class → (its attribute that, when true, keeps the block channels-first; the
# children that run channels-last otherwise).
_CHANNELS_LAST_PARTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "MaxxVitBlock": ("nchw_attn", ("attn_block", "attn_grid")),
    "ParallelMaxxVitBlock": (None, ("attn",)),
    "ConvNeXtBlock": ("use_conv_mlp", ("norm", "mlp")),
}


def _patch_grid(embed: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The patch embedding's grid for an input of ``size``: its fixed ``grid_size`` at its
    own ``img_size``, else what it computes for another size (``dynamic_img_size``)."""
    own = getattr(embed, "img_size", None)
    if own is not None and tuple(own) == size:
        grid = tuple(embed.grid_size)  # type: ignore[arg-type]
    else:
        grid = tuple(embed.dynamic_feat_size(size))  # type: ignore[operator]
    return int(grid[0]), int(grid[1])


def _inside_patch_embed(embed: nn.Module, rest: str, site: Site) -> Decision:
    """A module of the patch embedding: its output (and its norm's) as its ``output_fmt``
    says, the projection and a hybrid's CNN backbone ``(N, C, H, W)``."""
    dim = site.output.dim()
    grid = _patch_grid(embed, site.input_size)
    if rest in ("", "norm") and dim == 3:
        return match_tokens(site, (0,), [grid])
    if rest in ("", "norm") and dim == 4 and getattr(embed, "output_fmt", None) == "NHWC":
        return channels_last(site, [grid])
    if dim == 4:
        return Layout("nchw")
    return Refused(f"returns {site.shape_text()} inside the patch embedding")


def token_model(owner: nn.Module, inner: str, site: Site) -> Decision | None:
    embed = getattr(owner, "patch_embed", None)
    if not (
        from_library(owner, "timm")
        and isinstance(embed, nn.Module)
        and hasattr(owner, "num_prefix_tokens")
    ):
        return None
    top, _, rest = inner.partition(".")
    if top == "patch_embed":
        return _inside_patch_embed(embed, rest, site)
    if site.output.dim() == 3:
        grid = _patch_grid(embed, site.input_size)
        prefix = getattr(owner, "num_prefix_tokens", 0)
        return match_tokens(site, (int(prefix), 0), [grid])
    if site.output.dim() == 4:
        return Refused(
            f"returns {site.shape_text()} inside a token model: per-head attention "
            "(N, heads, tokens, dim), not a map"
        )
    return Refused(f"returns {site.shape_text()} inside a token model")


def _stage_grids(owner: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The grids of the model's stages at an input of ``size``, from the reductions its
    ``feature_info`` lists."""
    strides = [int(info["reduction"]) for info in getattr(owner, "feature_info", [])]
    return floor_and_ceil_grids(size, strides)


def channels_last_model(owner: nn.Module, inner: str, site: Site) -> Decision | None:
    # A model (its stages in ``feature_info``), not a patch embedding's own ``output_fmt``.
    if not (
        from_library(owner, "timm")
        and hasattr(owner, "feature_info")
        and getattr(owner, "output_fmt", None) == "NHWC"
    ):
        return None
    dim = site.output.dim()
    grids = _stage_grids(owner, site.input_size)
    if dim == 4 and isinstance(site.module, nn.Conv2d):
        return Layout("nchw")
    if dim == 4:
        return channels_last(site, grids)
    if dim == 3:
        return match_tokens(site, (0,), grids)
    return Refused(f"returns {site.shape_text()} inside a channels-last model")


def _channels_last_part(owner: nn.Module, inner: str) -> bool:
    """Whether the layer ``inner`` of ``owner`` is in a block's channels-last part."""
    for module, child in path_to(owner, inner):
        part = _CHANNELS_LAST_PARTS.get(type(module).__name__)
        if part is None or not from_library(module, "timm"):
            continue
        flag, children = part
        if (flag is None or not getattr(module, flag, True)) and child in children:
            return True
    return False


def model_with_channels_last_parts(owner: nn.Module, inner: str, site: Site) -> Decision | None:
    """An NCHW model (``feature_info`` lists its stages) whose blocks may run parts
    channels-last; the rest of it is left to the default, ``(N, C, H, W)``."""
    if not (from_library(owner, "timm") and hasattr(owner, "feature_info")):
        return None
    if not _channels_last_part(owner, inner):
        return None
    if site.output.dim() == 4:
        return channels_last(site, _stage_grids(owner, site.input_size))
    return Refused(f"returns {site.shape_text()} inside a block's channels-last part")


RULES: tuple[Rule, ...] = (token_model, channels_last_model, model_with_channels_last_parts)
