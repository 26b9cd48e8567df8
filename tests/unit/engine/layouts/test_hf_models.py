"""Hugging Face transformers' image classifiers explained without a declared layout
(service/engine/layouts/hf_models.py).

Each family at toy size (tests/library_models.py, wrapped to return the logits): the
default layer and its grid from ``model.config`` and the embeddings (class, distillation
and register tokens), a non-zero map there, our maps against pytorch-grad-cam's, and the
layers that return tuples read as their first element.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from service.engine.cuda_graphs import CapturedCam, ExplainedLayer, InputBuffer
from service.engine.gradcam import GradCAM
from service.engine.layers import survey_layers
from tests import library_models
from tests.unit.engine.layouts.cases import Case, Grid, check_default, check_reference, maps
from tests.unit.engine.test_buckets import EagerGraph

# Library models built per case (0.5-1.5 s each): in the full run, not the developer loop.
pytestmark = pytest.mark.slow

CASES: dict[str, Case] = {
    "vit": Case(
        library_models.hf_vit,
        (32, 32),
        Grid("model.vit.layers.1.layernorm_before", (24, 4, 4), "tokens", 1),
    ),
    "deit_with_teacher": Case(
        library_models.hf_deit,
        (32, 32),
        Grid("model.deit.layers.1.layernorm_before", (24, 4, 4), "tokens", 2),
    ),
    "beit": Case(
        library_models.hf_beit,
        (32, 32),
        Grid("model.beit.layers.1.layernorm_before", (24, 4, 4), "tokens", 1),
    ),
    # Made for 32×32, run at 32×48: a 4×6 grid.
    "dinov2": Case(
        library_models.hf_dinov2,
        (32, 48),
        Grid("model.dinov2.encoder.layer.1.norm1", (24, 4, 6), "tokens", 1),
    ),
    "dinov2_registers": Case(
        library_models.hf_dinov2_registers,
        (32, 32),
        Grid("model.dinov2_with_registers.encoder.layer.1.norm1", (24, 4, 4), "tokens", 5),
    ),
    "swin": Case(
        library_models.hf_swin,
        (32, 32),
        Grid("model.swin.encoder.layers.1.blocks.1.layernorm_before", (24, 4, 4), "tokens"),
        (Grid("model.swin.encoder.layers.0.blocks.1.layernorm_after", (12, 8, 8), "tokens"),),
    ),
    # At 36×44 its patch grid is padded up to 9×11, and 9×11 merged to 5×6: grids that no
    # count of tokens in the input's proportions would give.
    "swin_padded": Case(
        library_models.hf_swin,
        (36, 44),
        Grid("model.swin.encoder.layers.1.blocks.1.layernorm_before", (24, 5, 6), "tokens"),
        (Grid("model.swin.encoder.layers.0.blocks.1.layernorm_after", (12, 9, 11), "tokens"),),
    ),
    "convnext": Case(
        library_models.hf_convnext,
        (32, 32),
        Grid("model.convnext.encoder.stages.1", (24, 4, 4), "nchw"),
        (
            Grid("model.convnext.encoder.stages.1.layers.0.layernorm", (24, 4, 4), "nhwc"),
            Grid("model.convnext.encoder.stages.0.layers.0.pwconv1", (48, 8, 8), "nhwc"),
        ),
    ),
    "resnet": Case(
        library_models.hf_resnet,
        (32, 32),
        Grid("model.resnet.encoder.stages.1", (24, 4, 4), "nchw"),
    ),
}
COMPARED = [
    pytest.param(case, grid, id=f"{name}-{grid.layer.removeprefix('model.')}")
    for name, case in CASES.items()
    for grid in (case.default, *case.compared)
]


@pytest.mark.parametrize("name", list(CASES))
def test_default_layer_has_the_models_grid_and_a_map(name: str) -> None:
    check_default(CASES[name])


@pytest.mark.parametrize(("case", "grid"), COMPARED)
def test_maps_match_pytorch_grad_cam(case: Case, grid: Grid) -> None:
    check_reference(case, grid)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(2, 3, 32, 32)


def test_a_layer_that_returns_a_tuple_is_its_first_element(inputs: torch.Tensor) -> None:
    """ViT's attention returns (its output projection's tensor, the attention weights), a
    Swin stage (its patch merging's tensor, ...): the same maps as those layers'."""
    vit = library_models.hf_vit()
    attention = "model.vit.layers.1.attention"
    listed = {i.name: i for i in survey_layers(vit, 3, (32, 32)).offered}
    assert (listed[attention].kind, listed[attention].layout) == ("ViTAttention", "tokens")
    torch.testing.assert_close(
        maps(vit, attention, inputs), maps(vit, f"{attention}.o_proj", inputs)
    )
    swin = library_models.hf_swin()
    stage = "model.swin.encoder.layers.0"
    assert maps(swin, stage, inputs).shape == (2, 4, 4)
    torch.testing.assert_close(maps(swin, stage, inputs), maps(swin, f"{stage}.downsample", inputs))


def test_cuda_graph_step_reads_a_tuple_too(inputs: torch.Tensor) -> None:
    """The graphed step (replayed eagerly on the CPU) hooks a tuple layer as the engine does."""
    model = library_models.hf_vit()
    layer = "model.vit.layers.1.attention"
    captured = CapturedCam(
        ExplainedLayer(model, layer, "gradcam"),
        InputBuffer(2, (3, 32, 32), torch.device("cpu")),
        EagerGraph(None),
    )
    logits, cams = captured(inputs, torch.tensor([-1, 2]))
    eager = GradCAM(model)(inputs, layer, [[None], [2]], ["gradcam"] * 2)
    torch.testing.assert_close(logits, eager.logits)
    torch.testing.assert_close(cams, torch.stack([c[0] for c in eager.cams]))


def test_what_is_refused_and_why() -> None:
    survey = survey_layers(library_models.hf_swin(), 3, (32, 32))
    reasons = {r.name: r.reason for r in survey.refused}
    swin = "model.swin"
    assert reasons[swin] == "returns a SwinModelOutput, not a tensor"
    # Its pooler reads the tokens transposed, (N, C, 1): read as tokens, a C that happened
    # to be the grid's h·w would pass for 16 tokens of one channel.
    assert reasons[f"{swin}.pooler"] == "returns (N, 24, 1): a 1-D layer's (N, C, L), not tokens"
    bias = f"{swin}.encoder.layers.0.blocks.0.attention.relative_position_bias"
    assert reasons[bias] == (
        "returns (1, 2, 16, 16) for 2 images: windows or heads, not one map per image"
    )
    offered = {i.name for i in survey.offered}
    assert not offered & set(reasons)
    assert f"{swin}.encoder.layers.0.blocks.0" in offered  # a tuple: its first element


# Their configurations' own sizes (ViT-Base, DINOv2-Base with registers, Swin-Tiny),
# seeded random weights: seconds each on a CPU.
REAL: dict[str, Case] = {
    "vit": Case(
        partial(library_models.hf_model, "ViTConfig", "ViTForImageClassification", num_labels=5),
        (224, 224),
        Grid("model.vit.layers.11.layernorm_before", (768, 14, 14), "tokens", 1),
    ),
    "dinov2_registers": Case(
        partial(
            library_models.hf_model,
            "Dinov2WithRegistersConfig",
            "Dinov2WithRegistersForImageClassification",
            num_labels=5,
        ),
        (224, 224),
        Grid("model.dinov2_with_registers.encoder.layer.11.norm1", (768, 14, 14), "tokens", 5),
    ),
    "swin": Case(
        partial(library_models.hf_model, "SwinConfig", "SwinForImageClassification", num_labels=5),
        (224, 224),
        Grid("model.swin.encoder.layers.3.blocks.1.layernorm_before", (768, 7, 7), "tokens"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_sizes(name: str) -> None:
    model = REAL[name].build()
    check_default(REAL[name], model)
    found = check_reference(REAL[name], REAL[name].default, model)
    print(name, {method: round(r, 6) for method, r in found.items()})
