"""timm's models explained without a declared layout (service/engine/layouts/timm_models.py).

Each family at toy size (tests/library_models.py): the default layer and its grid from
the model's own attributes (its patch grid at the size it runs at, its prefix tokens,
its stages), a non-zero map there, and our maps against pytorch-grad-cam's.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from service.engine.layers import survey_layers
from service.engine.layouts import declare_layout
from tests import library_models
from tests.unit.engine.layouts.cases import Case, Grid, check_default, check_reference, maps

# Library models built per case (0.5-1.5 s each): in the full run, not the developer loop.
pytestmark = pytest.mark.slow

CASES: dict[str, Case] = {
    # A class token, then 16×16 patches of 48×64.
    "vit": Case(library_models.timm_vit, (48, 64), Grid("blocks.1.norm1", (24, 3, 4), "tokens", 1)),
    # Made for 64×64, run at 48×80: the grid is the patch embedding's at that size.
    "vit_dynamic": Case(
        library_models.timm_vit_dynamic,
        (48, 80),
        Grid("blocks.1.norm1", (24, 3, 5), "tokens", 1),
        (Grid("patch_embed", (24, 3, 5), "nhwc"),),
    ),
    "deit_distilled": Case(
        library_models.timm_deit, (64, 64), Grid("blocks.1.norm1", (24, 4, 4), "tokens", 2)
    ),
    "dinov2_registers": Case(
        library_models.timm_dinov2_registers,
        (56, 70),
        Grid("blocks.1.norm1", (24, 4, 5), "tokens", 5),
    ),
    "beit": Case(
        library_models.timm_beit, (64, 64), Grid("blocks.1.norm1", (24, 4, 4), "tokens", 1)
    ),
    "eva": Case(library_models.timm_eva, (56, 56), Grid("blocks.1.norm1", (24, 4, 4), "tokens", 1)),
    "hybrid": Case(
        library_models.timm_hybrid,
        (96, 96),
        Grid("blocks.1.norm1", (24, 3, 3), "tokens", 1),
        # Its CNN patch embedding's last stage, (N, C, H, W).
        (Grid("patch_embed.backbone.stages.2", (1024, 6, 6), "nchw"),),
    ),
    "swin": Case(
        library_models.timm_swin,
        (32, 32),
        Grid("layers.1.blocks.1.norm1", (24, 4, 4), "nhwc"),
        # Inside a block its MLP reads (N, H·W, C), no prefix: the stage's 8×8 and 4×4.
        (
            Grid("layers.0.blocks.1.norm2", (12, 8, 8), "tokens"),
            Grid("layers.1.blocks.1.mlp", (24, 4, 4), "tokens"),
        ),
    ),
    # NCHW stages, pooled by the head: the default is a CNN's, the last map before pooling.
    "maxvit": Case(
        library_models.timm_maxvit,
        (128, 128),
        Grid("norm", (256, 4, 4), "nchw"),
        (Grid("stages.3.blocks.1.attn_grid.norm1", (256, 4, 4), "nhwc"),),
    ),
    "coatnet": Case(library_models.timm_coatnet, (128, 128), Grid("norm", (512, 4, 4), "nchw")),
    "convnext": Case(
        library_models.timm_convnext,
        (128, 128),
        Grid("norm_pre", (320, 4, 4), "nchw"),
        (
            Grid("stages.3", (320, 4, 4), "nchw"),
            Grid("stages.3.blocks.1.norm", (320, 4, 4), "nhwc"),
            Grid("stages.2.blocks.1.mlp", (160, 8, 8), "nhwc"),
        ),
    ),
}
COMPARED = [
    pytest.param(case, grid, id=f"{name}-{grid.layer}")
    for name, case in CASES.items()
    for grid in (case.default, *case.compared)
    if grid.layer != "norm_pre"  # an Identity: no parameters for pytorch-grad-cam's graph
]


@pytest.mark.parametrize("name", list(CASES))
def test_default_layer_has_the_models_grid_and_a_map(name: str) -> None:
    check_default(CASES[name])


@pytest.mark.parametrize(("case", "grid"), COMPARED)
def test_maps_match_pytorch_grad_cam(case: Case, grid: Grid) -> None:
    check_reference(case, grid)


def test_a_dynamic_vit_takes_its_grid_from_the_input() -> None:
    model = library_models.timm_vit_dynamic()
    for size, grid in [((64, 64), (4, 4)), ((48, 80), (3, 5)), ((80, 48), (5, 3))]:
        listed = {i.name: i for i in survey_layers(model, 3, size).offered}
        assert (listed["blocks.1.norm1"].height, listed["blocks.1.norm1"].width) == grid


def test_what_is_refused_and_why() -> None:
    vit = survey_layers(library_models.timm_vit(), 3, (48, 64))
    reasons = {r.name: r.reason for r in vit.refused}
    # Per-head query and key norms are 4-D, and no map.
    assert "per-head attention" in reasons["blocks.1.attn.q_norm"]
    assert "blocks.1.attn.q_norm" not in {i.name for i in vit.offered}

    swin = survey_layers(library_models.timm_swin(), 3, (32, 32))
    reasons = {r.name: r.reason for r in swin.refused}
    # Four 4×4 windows of the 8×8 stage: rows that are windows, not images.
    assert reasons["layers.0.blocks.0.attn"] == (
        "returns (8, 16, 12) for 2 images: windows or heads, not one map per image"
    )
    # One window covers the 4×4 stage: its attention (N, heads, 16, 16) is 4-D like a map.
    assert reasons["layers.1.blocks.0.attn.softmax"] == (
        "returns (N, 2, 16, 16): read as (N, H, W, C), its H×W is none of the model's "
        "grids (8×8, 4×4)"
    )
    # ... while that window's tokens are the stage's map itself, row by row.
    assert "layers.1.blocks.0.attn" in {i.name for i in swin.offered}


def test_a_swin_window_over_the_whole_stage_is_its_map() -> None:
    """The last stage's one window: its attention's tokens are the stage's positions in
    order, so its map is the map of the block's own (N, H, W, C) a layer before."""
    model = library_models.timm_swin()
    torch.manual_seed(4)
    inputs = torch.randn(2, 3, 32, 32)
    assert maps(model, "layers.1.blocks.1.attn", inputs).shape == (2, 4, 4)
    torch.testing.assert_close(
        maps(model, "layers.1.blocks.1.attn.proj", inputs),
        maps(model, "layers.1.blocks.1.attn", inputs),
    )


def test_a_declared_layout_overrides_auto() -> None:
    model = library_models.timm_vit()
    # Wrongly declared: no prefix. The blocks' 1 + 12 tokens then tile nothing; the patch
    # embedding's 12 do.
    declare_layout(model, "tokens", 0)
    survey = survey_layers(model, 3, (48, 64))
    offered = {i.name: (i.channels, i.height, i.width, i.layout) for i in survey.offered}
    assert "blocks.1.norm1" not in offered
    assert offered["patch_embed"] == (24, 3, 4, "tokens")
    assert "do not tile the input" in {r.name: r.reason for r in survey.refused}["blocks.1.norm1"]


# At their real sizes, seeded random weights: seconds each on a CPU.
REAL: dict[str, Case] = {
    "vit_small_patch16_224": Case(
        partial(library_models.timm_model, "vit_small_patch16_224", num_classes=5),
        (224, 224),
        Grid("blocks.11.norm1", (384, 14, 14), "tokens", 1),
    ),
    # Made for 518×518, run at 224×308 with dynamic_img_size.
    "vit_small_patch14_reg4_dinov2": Case(
        partial(
            library_models.timm_model,
            "vit_small_patch14_reg4_dinov2",
            num_classes=5,
            dynamic_img_size=True,
        ),
        (224, 308),
        Grid("blocks.11.norm1", (384, 16, 22), "tokens", 5),
    ),
    "swin_tiny_patch4_window7_224": Case(
        partial(library_models.timm_model, "swin_tiny_patch4_window7_224", num_classes=5),
        (224, 224),
        Grid("layers.3.blocks.1.norm1", (768, 7, 7), "nhwc"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_sizes(name: str) -> None:
    model = REAL[name].build()
    check_default(REAL[name], model)
    found = check_reference(REAL[name], REAL[name].default, model)
    print(name, {method: round(r, 6) for method, r in found.items()})
