"""torchvision's transformers, known by type: ``VisionTransformer`` (one class token, then
its ``image_size / patch_size`` squared patches) and ``SwinTransformer`` (channels-last
from its patch embedding's ``Permute`` to its final ``norm``)."""

from __future__ import annotations

from torch import nn

from service.engine.layouts.base import Decision, Layout, Refused, Rule, Site, from_library

# The modules of a torchvision Swin whose 4-D outputs are (N, H, W, C); its
# ``permute`` and ``avgpool`` come after the maps are turned back to (N, C, H, W).
_SWIN_CHANNELS_LAST = ("features", "norm")


def vit(owner: nn.Module, inner: str, site: Site) -> Decision | None:
    if not from_library(owner, "torchvision"):
        return None  # torchvision is imported for its own models only (~0.8 s)
    from torchvision.models import VisionTransformer

    if not isinstance(owner, VisionTransformer) or site.output.dim() != 3:
        return None  # its patch embedding's convolution is (N, C, H, W), as any other
    side = owner.image_size // owner.patch_size
    if site.output.shape[1] != 1 + side * side:
        return Refused(
            f"returns {site.shape_text()}: not the class token and {side}×{side} patch tokens"
        )
    return Layout("tokens", 1, (side, side))


def swin(owner: nn.Module, inner: str, site: Site) -> Decision | None:
    if not from_library(owner, "torchvision"):
        return None
    from torchvision.models import SwinTransformer

    if (
        isinstance(owner, SwinTransformer)
        and site.output.dim() == 4
        and inner.split(".")[0] in _SWIN_CHANNELS_LAST
        and not isinstance(site.module, nn.Conv2d)
    ):
        return Layout("nhwc")
    return None


RULES: tuple[Rule, ...] = (vit, swin)
