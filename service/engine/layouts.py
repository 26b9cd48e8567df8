"""Where a layer's output keeps its feature map, and its ``(N, C, h, w)`` view.

The CAM formulas (``gradcam.py``) weigh ``(N, C, h, w)`` maps. CNN layers return
those; transformer layers do not:

- a ViT's blocks (torchvision ``VisionTransformer``) return token sequences
  ``(N, 1 + h·w, C)``: the class token, then one token per patch, row by row. The
  class token has no place on the image: it is dropped and the rest reshaped to
  ``(N, C, h, w)``;
- torchvision's Swin (``SwinTransformer``) keeps its maps channels-last,
  ``(N, H, W, C)``, from its patch embedding's ``Permute`` to its final ``norm``:
  permuted to ``(N, C, H, W)``. Such a tensor is 4-D like a CNN's, so its shape
  cannot tell it apart (a 7×7×768 map would read as 7 channels of 7×768).

So a layout is decided by the types of the model's modules, never guessed from a
shape. "auto" (``layer_layout``): a module inside a torchvision ViT whose output is
its 1 + h·w tokens; a module inside a Swin's ``features`` or ``norm``, except its
patch-embedding convolution; every other 4-D output is ``(N, C, H, W)``, as before
transformers were explained, so a CNN's maps are computed exactly as before.

A model that "auto" does not know (a timm or Hugging Face ViT behind a factory)
declares one layout for the whole model in the models file (``layout``,
``prefix_tokens``). ``declare_layout`` keeps it on the model's root module, as
``folding.py`` keeps a folded convolution's batch norm on it, so every engine built
on the module (the tuning probes, the CUDA graphs) reads the same layout.

The activation and its gradient go through the same view (a slice and a
permutation: the class token's gradient is dropped with it), so every CAM formula
works on the grid unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models import SwinTransformer, VisionTransformer

from service.contract.terms import LayerLayout, LayoutSetting

# The attribute of a model's root module that holds its declared layout.
_DECLARED = "_gradcam_layout"
# The modules of a torchvision Swin whose 4-D outputs are (N, H, W, C); its
# ``permute`` and ``avgpool`` come after the maps are turned back to (N, C, H, W).
_SWIN_CHANNELS_LAST = ("features", "norm")


@dataclass(frozen=True)
class DeclaredLayout:
    """What a models file declares: ``setting`` for every layer, and for tokens how
    many come before the grid."""

    setting: LayoutSetting
    prefix_tokens: int = 1


@dataclass(frozen=True)
class Layout:
    """How one layer's output holds its map: ``kind``; for ``tokens`` the ``prefix``
    tokens dropped and the ``grid`` ``(h, w)`` the others fill, row by row."""

    kind: LayerLayout
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)

    def to_grid(self, x: Tensor) -> Tensor:
        """``x`` as the layer returns it (or its gradient) → ``(N, C, h, w)``; for
        ``nchw`` the very tensor, so a CNN's maths is untouched."""
        if self.kind == "nchw":
            return x
        if self.kind == "nhwc":
            return x.permute(0, 3, 1, 2)
        h, w = self.grid
        return x[:, self.prefix :].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def grid_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(C, h, w)`` of the map, from the layer's output ``shape``."""
        if self.kind == "nchw":
            return shape[1], shape[2], shape[3]
        if self.kind == "nhwc":
            return shape[3], shape[1], shape[2]
        return shape[2], *self.grid


def declare_layout(model: nn.Module, setting: LayoutSetting, prefix_tokens: int | None) -> None:
    """Record the models file's ``layout`` on ``model`` (nothing for "auto")."""
    if setting == "auto":
        return
    declared = DeclaredLayout(setting, 1 if prefix_tokens is None else prefix_tokens)
    # A plain attribute, not a buffer: nn.Module keeps it as it is, through deepcopy too.
    setattr(model, _DECLARED, declared)


def token_grid(tokens: int, prefix: int, input_size: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` of the ``tokens - prefix`` patch tokens when they tile the input's
    ``(height, width)`` in the same proportion (square patches); None if they cannot."""
    cells = tokens - prefix
    height, width = input_size
    if cells <= 0 or (cells * height) % width:
        return None
    squared = cells * height // width  # h² = h·w · height / width
    rows = math.isqrt(squared)
    if rows == 0 or rows * rows != squared or cells % rows:
        return None
    return rows, cells // rows


def _transformer_owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The nearest torchvision ViT or Swin that holds module ``name`` (a wrapper's
    ``self.vit`` too), and the module's name inside it."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        owner = model.get_submodule(prefix) if prefix else model
        if isinstance(owner, VisionTransformer | SwinTransformer):
            return owner, ".".join(parts[depth:])
    return None, name


def _declared_layout(
    declared: DeclaredLayout, module: nn.Module, output: Tensor, input_size: tuple[int, int]
) -> Layout | None:
    if declared.setting == "tokens" and output.dim() == 3:
        grid = token_grid(output.shape[1], declared.prefix_tokens, input_size)
        return None if grid is None else Layout("tokens", declared.prefix_tokens, grid)
    # A patch embedding's convolution returns (N, C, H, W) whatever the blocks after it do.
    if declared.setting == "nhwc" and output.dim() == 4 and not isinstance(module, nn.Conv2d):
        return Layout("nhwc")
    return Layout("nchw") if output.dim() == 4 else None


def layer_layout(
    model: nn.Module, name: str, module: nn.Module, output: object, input_size: tuple[int, int]
) -> Layout | None:
    """The layout of ``output``, which module ``name`` of ``model`` returned for an input
    of ``input_size`` ``(height, width)``; None if it holds no map to explain."""
    if not isinstance(output, Tensor):
        return None
    declared = getattr(model, _DECLARED, None)
    if isinstance(declared, DeclaredLayout):
        return _declared_layout(declared, module, output, input_size)
    owner, inner = _transformer_owner(model, name)
    if isinstance(owner, VisionTransformer) and output.dim() == 3:
        # torchvision's ViT: one class token, then its image_size / patch_size squared.
        side = owner.image_size // owner.patch_size
        if output.shape[1] != 1 + side * side:
            return None
        return Layout("tokens", 1, (side, side))
    if (
        isinstance(owner, SwinTransformer)
        and output.dim() == 4
        and inner.split(".")[0] in _SWIN_CHANNELS_LAST
        and not isinstance(module, nn.Conv2d)
    ):
        return Layout("nhwc")
    return Layout("nchw") if output.dim() == 4 else None
