"""A layout the models file declares for a whole model (``layout``, ``prefix_tokens``),
kept on the model's root module; it overrides "auto"."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from service.contract.terms import LayoutSetting
from service.engine.layouts.base import Decision, Layout, Refused, Site, token_grid

# The attribute of a model's root module that holds its declared layout.
_DECLARED = "_gradcam_layout"


@dataclass(frozen=True)
class DeclaredLayout:
    """What a models file declares: ``setting`` for every layer, and for tokens how
    many come before the grid."""

    setting: LayoutSetting
    prefix_tokens: int = 1


def declare_layout(model: nn.Module, setting: LayoutSetting, prefix_tokens: int | None) -> None:
    """Record the models file's ``layout`` on ``model`` (nothing for "auto")."""
    if setting == "auto":
        return
    declared = DeclaredLayout(setting, 1 if prefix_tokens is None else prefix_tokens)
    # A plain attribute, not a buffer: nn.Module keeps it as it is, through deepcopy too.
    setattr(model, _DECLARED, declared)


def declared_layout(model: nn.Module) -> DeclaredLayout | None:
    declared = getattr(model, _DECLARED, None)
    return declared if isinstance(declared, DeclaredLayout) else None


def decide_declared(declared: DeclaredLayout, site: Site) -> Decision:
    """``site`` under the models file's layout: tokens must tile the input in its
    proportions; a declared ``nhwc`` leaves convolutions ``(N, C, H, W)``."""
    dim = site.output.dim()
    if declared.setting == "tokens" and dim == 3:
        grid = token_grid(site.output.shape[1], declared.prefix_tokens, site.input_size)
        if grid is None:
            return Refused(
                f"returns {site.shape_text()}: its tokens less the {declared.prefix_tokens} "
                "declared prefix tokens do not tile the input in its proportions"
            )
        return Layout("tokens", declared.prefix_tokens, grid)
    # A patch embedding's convolution returns (N, C, H, W) whatever the blocks after it do.
    if declared.setting == "nhwc" and dim == 4 and not isinstance(site.module, nn.Conv2d):
        return Layout("nhwc")
    if dim == 4:
        return Layout("nchw")
    return Refused(
        f"returns {site.shape_text()}, not what the declared layout '{declared.setting}' reads"
    )
