"""Transformers: a ViT's tokens and a Swin's channels-last maps explained as grids.

Our maps against pytorch-grad-cam's with its ``reshape_transform`` on the same layer
and targets, at the layer's resolution, as ``test_references.py`` checks the CNNs:
torchvision's ViT and Swin at toy sizes in the developer loop, ``vit_b_16`` and
``swin_t`` (seeded random weights) in the slow tests, and models that declare their
layout in the models file.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam import GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform
from torch import Tensor, nn

from service.cli import main
from service.contract.errors import ConfigError
from service.contract.models_file import load_models_file
from service.engine.cuda_graphs import CapturedCam, ExplainedLayer, InputBuffer
from service.engine.gradcam import GradCAM
from service.engine.layers import default_layer, probe_layers, resolve_layer
from service.engine.layouts import token_grid
from service.engine.loading.models import load_model
from tests.helpers import seeded_model
from tests.tiny_transformers import tiny_swin, tiny_vit
from tests.unit.engine.test_buckets import EagerGraph

REFERENCE_CLASSES = {
    "gradcam": ReferenceGradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
}
Reshape = Callable[[Tensor], Tensor]


def _channels_first(x: Tensor) -> Tensor:
    # pytorch-grad-cam's swinT_reshape_transform is for timm's (N, H·W, C) Swin;
    # torchvision's Swin returns (N, H, W, C), which only needs its channels first.
    return x.permute(0, 3, 1, 2)


def _targets(model: nn.Module, inputs: Tensor) -> list[int]:
    """For each image in turn its highest-scoring class not yet taken (a random model's
    low-scoring classes can have all-zero maps, which would compare nothing)."""
    with torch.no_grad():
        logits = model(inputs)
    targets: list[int] = []
    for row in logits:
        targets.append(next(int(c) for c in row.argsort(descending=True) if int(c) not in targets))
    return targets


def _ours(
    model: nn.Module, layer: str, inputs: Tensor, targets: list[int], methods: list[str]
) -> dict[str, np.ndarray]:
    """Every method's maps from one engine call: the images repeated once per method."""
    n = len(inputs)
    out = GradCAM(model)(
        inputs.repeat(len(methods), 1, 1, 1),
        layer,
        [[t] for t in targets] * len(methods),
        [method for method in methods for _ in range(n)],
    )
    maps = torch.stack([cams[0] for cams in out.cams]).numpy()
    return {method: maps[k * n : (k + 1) * n] for k, method in enumerate(methods)}


def _reference(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: list[int],
    reshape: Reshape,
    methods: list[str],
) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's maps before it resizes them: one forward and backward, then
    each method's formula on the same reshaped activations and gradients."""
    module = resolve_layer(model, layer)
    # It calls .backward(): the layer's own parameters need grad so that its output has
    # a graph. Nothing before the layer does, so its backward stops there, as ours does.
    assert any(True for _ in module.parameters())
    module.requires_grad_(True)
    try:
        return reference_maps(model, module, inputs, targets, reshape, methods)
    finally:
        module.requires_grad_(False)
        for parameter in module.parameters():
            parameter.grad = None


def reference_maps(
    model: nn.Module,
    module: nn.Module,
    inputs: Tensor,
    targets: list[int],
    reshape: Reshape,
    methods: Sequence[str],
) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's maps at ``module`` (its hooks' activations and gradients, then
    each method's formula), after the ReLU, before it resizes them. The caller gives the
    graph its backward needs (parameters that require grad)."""
    cam = ReferenceGradCAM(model=model, target_layers=[module], reshape_transform=reshape)
    try:
        cam(inputs, [ClassifierOutputTarget(t) for t in targets])
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
    finally:
        cam.activations_and_grads.release()
    maps = {}
    for method in methods:
        formula = REFERENCE_CLASSES[method](model=model, target_layers=[module])
        formula.activations_and_grads.release()
        raw = formula.get_cam_image(inputs, module, None, activations, gradients, False)
        maps[method] = np.maximum(raw, 0)
    return maps


def _lowest_pearson(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    # Every map must say something: an all-zero pair would compare nothing.
    assert all(reference[i].max() > 0 for i in range(len(reference)))
    return min(
        float(np.corrcoef(ours[i].ravel(), reference[i].ravel())[0, 1]) for i in range(len(ours))
    )


def _assert_match(
    model: nn.Module, layer: str, inputs: Tensor, reshape: Reshape, methods: list[str]
) -> dict[str, float]:
    targets = _targets(model, inputs)
    ours = _ours(model, layer, inputs, targets, methods)
    reference = _reference(model, layer, inputs, targets, reshape, methods)
    found = {method: _lowest_pearson(ours[method], reference[method]) for method in methods}
    for method, r in found.items():
        # As for the CNNs: gradcam++ differs by pytorch-grad-cam's 1e-7 in its alpha.
        minimum = 0.999 if method == "gradcam" else 0.99
        assert r >= minimum, f"{method}: Pearson {r:.5f} < {minimum}"
    return found


def test_token_grids_follow_the_input() -> None:
    assert token_grid(197, 1, (224, 224)) == (14, 14)  # ViT-B/16
    assert token_grid(1 + 24, 1, (32, 48)) == (4, 6)  # rows as the input's height
    assert token_grid(49, 0, (224, 224)) == (7, 7)  # no class token
    assert token_grid(197, 0, (224, 224)) is None
    assert token_grid(1 + 24, 1, (32, 32)) is None  # 24 tokens tile no square
    assert token_grid(1, 1, (32, 32)) is None


# name: factory, default layer, its (C, h, w), its layout, pytorch-grad-cam's reshape
TINY: dict[str, tuple[Callable[[], nn.Module], str, tuple[int, int, int], str, Reshape]] = {
    "vit": (
        tiny_vit,
        "encoder.layers.encoder_layer_1.ln_1",
        (16, 4, 4),
        "tokens",
        partial(vit_reshape_transform, height=4, width=4),
    ),
    "swin": (tiny_swin, "features.3.1.norm1", (16, 4, 4), "nhwc", _channels_first),
}


@pytest.fixture(scope="module")
def inputs() -> Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _tiny(name: str) -> nn.Module:
    model = TINY[name][0]().eval()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", list(TINY))
def test_layers_are_listed_as_grids(name: str) -> None:
    model = _tiny(name)
    _, layer, shape, layout, _ = TINY[name]
    layers = {info.name: info for info in probe_layers(model, 3, (32, 32))}
    assert default_layer(list(layers.values()), model, 5) == layer
    assert (layers[layer].channels, layers[layer].height, layers[layer].width) == shape
    assert layers[layer].layout == layout and layers[layer].kind == "LayerNorm"
    listed = {name: (i.channels, i.height, i.width, i.layout) for name, i in layers.items()}
    if name == "vit":
        assert listed["conv_proj"] == (16, 4, 4, "nchw")  # the patch embedding
        assert listed["encoder.layers.encoder_layer_1.mlp.0"] == (32, 4, 4, "tokens")
        assert "encoder.layers.encoder_layer_1.self_attention" not in listed  # returns a tuple
    else:
        assert listed["features.0.0"] == (8, 8, 8, "nchw")  # the patch embedding's conv
        assert listed["features.0.1"] == (8, 8, 8, "nhwc")  # its Permute
        assert listed["norm"] == (16, 4, 4, "nhwc")
        assert listed["permute"] == (16, 4, 4, "nchw")  # back to channels first
        assert listed["avgpool"] == (16, 1, 1, "nchw")


def test_a_wrapped_vit_is_known_too() -> None:
    """A project's own class around torchvision's ViT (as CheXNet wraps its DenseNet)."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = _tiny("vit")

        def forward(self, x: Tensor) -> Tensor:
            return self.vit(x)

    model = Wrapper()
    layers = probe_layers(model, 3, (32, 32))
    assert default_layer(layers, model, 5) == "vit.encoder.layers.encoder_layer_1.ln_1"


@pytest.mark.parametrize("name", list(TINY))
def test_maps_match_pytorch_grad_cam(name: str, inputs: Tensor) -> None:
    _, layer, _, _, reshape = TINY[name]
    _assert_match(_tiny(name), layer, inputs, reshape, list(REFERENCE_CLASSES))


def test_vit_layers_after_the_last_attention_have_no_map(inputs: Tensor) -> None:
    """Why the default is the last attention's input: the head reads the class token
    alone, and after the last attention no patch token reaches it."""
    model = _tiny("vit")
    engine = GradCAM(model)
    last = "encoder.layers.encoder_layer_1"
    for layer, informative in [
        (f"{last}.ln_1", True),
        (f"{last}.ln_2", False),
        (last, False),
        ("encoder.ln", False),
    ]:
        out = engine(inputs, layer, [[None], [None]], ["gradcam"] * 2)
        assert all(bool((cams[0] > 0).any()) == informative for cams in out.cams), layer


def test_swin_channels_last_map_is_its_permuted_one(inputs: Tensor) -> None:
    """Swin's ``permute`` turns ``norm``'s (N, H, W, C) into (N, C, H, W): both layers
    must give the same maps (a transposed grid would not, on random inputs)."""
    model = _tiny("swin")
    engine = GradCAM(model)
    maps = {
        layer: torch.stack([c[0] for c in engine(inputs, layer, [[1], [3]], ["gradcam"] * 2).cams])
        for layer in ("norm", "permute")
    }
    assert maps["norm"].shape == (2, 4, 4) and float(maps["norm"].max()) > 0
    torch.testing.assert_close(maps["norm"], maps["permute"], rtol=1e-5, atol=1e-7)


def _models_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_declared_layouts(tmp_path: Path) -> None:
    """Models that "auto" does not know declare their layout; non-square inputs, so a
    grid read column by column would not match."""
    path = _models_file(
        tmp_path,
        """
        [models.tokens]
        arch = "tests.tiny_transformers:token_net"
        input_size = [32, 48]
        layout = "tokens"
        prefix_tokens = 1

        [models.undeclared]
        arch = "tests.tiny_transformers:token_net"
        input_size = [32, 48]

        [models.channels_last]
        arch = "tests.tiny_transformers:channels_last_net"
        input_size = [32, 48]
        layout = "nhwc"
        """,
    )
    models = load_models_file(path)
    torch.manual_seed(2)
    inputs = torch.randn(2, 3, 32, 48)

    tokens = load_model("tokens", models)
    assert tokens.default_layer == "blocks.1.norm1"
    listed = {i.name: (i.channels, i.height, i.width, i.layout) for i in tokens.layers}
    assert listed["blocks.1.norm1"] == (16, 4, 6, "tokens")
    assert listed["patch"] == (16, 4, 6, "nchw")
    reshape = partial(vit_reshape_transform, height=4, width=6)
    _assert_match(tokens.module, "blocks.1.norm1", inputs, reshape, ["gradcam"])

    # Undeclared, its tokens are no feature map: only the patch embedding is.
    undeclared = load_model("undeclared", models)
    assert [i.name for i in undeclared.layers] == ["patch"]
    assert undeclared.default_layer == "patch"

    channels_last = load_model("channels_last", models)
    listed = {i.name: (i.channels, i.height, i.width, i.layout) for i in channels_last.layers}
    assert listed["patch"] == (16, 4, 6, "nchw")  # a convolution's output stays (N, C, H, W)
    assert listed["norm"] == (16, 4, 6, "nhwc")
    assert channels_last.default_layer == "act"  # no attention: the last map, as for a CNN
    _assert_match(channels_last.module, "norm", inputs, _channels_first, ["gradcam"])


def test_prefix_tokens_needs_the_tokens_layout(tmp_path: Path) -> None:
    path = _models_file(tmp_path, '[models.m]\narch = "vit_b_16"\nprefix_tokens = 2\n')
    with pytest.raises(ConfigError, match=r"model 'm'.*prefix_tokens is only read with"):
        load_models_file(path)
    path = _models_file(tmp_path, '[models.m]\narch = "vit_b_16"\nlayout = "rows"\n')
    with pytest.raises(ConfigError, match="model 'm', key 'layout'"):
        load_models_file(path)


def test_cuda_graph_step_explains_tokens(inputs: Tensor) -> None:
    """The graphed step (here replayed eagerly on the CPU) views tokens as the engine does."""
    model = _tiny("vit")
    layer = TINY["vit"][1]
    captured = CapturedCam(
        ExplainedLayer(model, layer, "gradcam"),
        InputBuffer(2, (3, 32, 32), torch.device("cpu")),
        EagerGraph(None),
    )
    logits, maps = captured(inputs, torch.tensor([-1, 2]))
    eager = GradCAM(model)(inputs, layer, [[None], [2]], ["gradcam"] * 2)
    torch.testing.assert_close(logits, eager.logits)
    torch.testing.assert_close(maps, torch.stack([c[0] for c in eager.cams]))


def test_layers_command_shows_what_a_grid_was_made_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _models_file(
        tmp_path,
        """
        [models.vit]
        arch = "tests.tiny_transformers:tiny_vit"
        input_size = [32, 32]
        memory_format = "contiguous"
        [models.swin]
        arch = "tests.tiny_transformers:tiny_swin"
        input_size = [32, 32]
        memory_format = "contiguous"
        """,
    )
    assert main(["layers", "--models", str(path), "--model", "vit"]) == 0
    out = capsys.readouterr().out
    assert "* encoder.layers.encoder_layer_1.ln_1" in out and "16×4×4  (from tokens)" in out
    assert main(["layers", "--models", str(path), "--model", "swin"]) == 0
    out = capsys.readouterr().out
    assert "* features.3.1.norm1" in out and "16×4×4  (from H×W×C)" in out


# The models issue #21 names, at their real sizes: seconds each on a CPU.
TORCHVISION: dict[str, tuple[str, tuple[int, int, int], str, Reshape]] = {
    "vit_b_16": (
        "encoder.layers.encoder_layer_11.ln_1",
        (768, 14, 14),
        "tokens",
        partial(vit_reshape_transform, height=14, width=14),
    ),
    "swin_t": ("features.7.1.norm1", (768, 7, 7), "nhwc", _channels_first),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_torchvision_transformers_match_pytorch_grad_cam(arch: str) -> None:
    layer, shape, layout, reshape = TORCHVISION[arch]
    model = seeded_model(arch)
    if arch == "vit_b_16":
        # torchvision starts ViT's head at zero (every map would be 0); Swin's at std 0.02.
        torch.manual_seed(2)
        head = model.get_submodule("heads.head")
        assert isinstance(head, nn.Linear)
        nn.init.normal_(head.weight, std=0.02)
    layers = probe_layers(model, 3, (224, 224))
    assert default_layer(layers, model, 1000) == layer
    info = next(i for i in layers if i.name == layer)
    assert ((info.channels, info.height, info.width), info.layout) == (shape, layout)
    torch.manual_seed(1)
    inputs = torch.randn(2, 3, 224, 224)
    # Not gradcam++: these layers' gradients are ~1e-3, their squares as small as the 1e-6
    # pytorch-grad-cam adds to its alpha's denominator, so its maps are its epsilon's
    # (Pearson 0.77-0.98 here, 1.0 with its formula without it); the toy models above,
    # whose gradients are larger, compare it.
    methods = [method for method in REFERENCE_CLASSES if method != "gradcam++"]
    found = _assert_match(model, layer, inputs, reshape, methods)
    print(arch, {method: round(r, 6) for method, r in found.items()})
