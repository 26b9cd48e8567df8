"""What the library tests check for each model family (test_timm_models.py,
test_hf_models.py): its default layer and grid, a non-zero map there, and our maps against
pytorch-grad-cam's on the same layer and input, with the reshape_transform that family
needs (pytorch-grad-cam's own where it has one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform, vit_reshape_transform
from torch import Tensor, nn

from service.engine.gradcam import GradCAM
from service.engine.layers import default_layer, survey_layers
from tests.unit.engine.test_transformers import Reshape, _assert_match, _channels_first

# Not gradcam++: with these random heads the gradients are so small that the 1e-7
# pytorch-grad-cam adds to its alpha's denominator outweighs them (test_transformers'
# slow test says the same of vit_b_16 and swin_t); its toy ViT and Swin compare it.
METHODS = ["gradcam", "xgradcam", "layercam", "hirescam"]


@dataclass(frozen=True)
class Grid:
    """A layer and its map as the family's own grid says it must be: ``(C, h, w)``,
    layout and, for tokens, how many prefix tokens come before the patches."""

    layer: str
    shape: tuple[int, int, int]
    layout: str
    prefix: int = 0

    def reshape(self) -> Reshape:
        """pytorch-grad-cam's reshape_transform for this layer."""
        _, h, w = self.shape
        if self.layout == "nhwc":
            return _channels_first
        if self.layout == "tokens" and self.prefix == 1:
            return lambda x: vit_reshape_transform(x, height=h, width=w)
        if self.layout == "tokens":
            # Its ViT transform drops one token; with others first, they go before its
            # (N, h·w, C) transform for Swin.
            return lambda x: swinT_reshape_transform(x[:, self.prefix :], height=h, width=w)
        return lambda x: x


@dataclass(frozen=True)
class Case:
    """A family: its builder, the input size it runs at, its default layer, and the
    other layers compared with the reference."""

    build: Callable[[], nn.Module]
    input_size: tuple[int, int]
    default: Grid
    compared: tuple[Grid, ...] = field(default_factory=tuple)


def check_default(case: Case, model: nn.Module | None = None) -> None:
    """The default layer, its grid from the model's own attributes, a non-zero map there
    for a random image (``model``: ``case.build()`` unless given)."""
    model = model or case.build()
    survey = survey_layers(model, 3, case.input_size)
    layer = default_layer(survey.offered, model, 5)
    assert layer == case.default.layer
    info = next(i for i in survey.offered if i.name == layer)
    assert ((info.channels, info.height, info.width), info.layout) == (
        case.default.shape,
        case.default.layout,
    )
    assert layer not in {r.name for r in survey.refused}
    torch.manual_seed(3)
    image = torch.randn(1, 3, *case.input_size)  # as a normalised image is
    cam = GradCAM(model)(image, layer, [[None]], ["gradcam"]).cams[0][0]
    assert cam.shape == case.default.shape[1:]
    assert float(cam.max()) > 0, "an all-zero map at the default layer"


def check_reference(case: Case, grid: Grid, model: nn.Module | None = None) -> dict[str, float]:
    """Our maps at ``grid.layer`` against pytorch-grad-cam's: Pearson ≥ 0.999 (gradcam),
    ≥ 0.99 (the others), per image at the layer's grid (``_assert_match``)."""
    model = model or case.build()
    listed = {i.name: i for i in survey_layers(model, 3, case.input_size).offered}
    info = listed[grid.layer]
    assert ((info.channels, info.height, info.width), info.layout) == (grid.shape, grid.layout)
    torch.manual_seed(1)
    inputs = torch.randn(2, 3, *case.input_size)
    return _assert_match(model, grid.layer, inputs, grid.reshape(), METHODS)


def maps(model: nn.Module, layer: str, inputs: Tensor) -> Tensor:
    """``(N, h, w)`` Grad-CAM maps of ``inputs``' top-1 classes at ``layer``."""
    out = GradCAM(model)(inputs, layer, [[None]] * len(inputs), ["gradcam"] * len(inputs))
    return torch.stack([cams[0] for cams in out.cams])
