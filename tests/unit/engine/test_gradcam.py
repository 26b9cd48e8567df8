"""The engine's own guarantees: batch invariance, lifecycle, targets, edge cases."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

from service.contract.terms import METHODS
from service.engine.gradcam import GradCAM, LayerOutputError, TargetError, formula_methods
from service.engine.layers import UnknownLayerError, default_layer, probe_layers
from service.engine.runtime import Runtime
from tests.helpers import seeded_model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return seeded_model("resnet18")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance(resnet: nn.Module, method: str) -> None:
    torch.manual_seed(2)
    inputs = torch.randn(8, 3, 128, 128)
    targets: list[list[int | None]] = [[t] for t in (None, 1, 5, 9, None, 300, 999, 42)]
    engine = GradCAM(resnet)
    batch = engine(inputs, "layer4", targets, [method] * 8)
    for i in range(8):
        alone = engine(inputs[i : i + 1], "layer4", [targets[i]], [method])
        assert alone.targets[0] == batch.targets[i]
        assert torch.allclose(alone.cams[0][0], batch.cams[i][0], atol=1e-5, rtol=0), i
        assert torch.allclose(alone.logits[0], batch.logits[i], atol=1e-4)


def test_mixed_methods_in_one_batch_equal_separate_calls(resnet: nn.Module) -> None:
    torch.manual_seed(3)
    inputs = torch.randn(5, 3, 96, 96)
    engine = GradCAM(resnet)
    mixed = engine(inputs, "layer4", [[7]] * 5, list(METHODS))
    for i, method in enumerate(METHODS):
        alone = engine(inputs[i : i + 1], "layer4", [[7]], [method])
        assert torch.allclose(alone.cams[0][0], mixed.cams[i][0], atol=1e-5, rtol=0), method


def test_several_targets_per_image_match_single_target_calls(resnet: nn.Module) -> None:
    torch.manual_seed(4)
    inputs = torch.randn(3, 3, 128, 128)
    targets: list[list[int | None]] = [[1, 2, 3], [None], [500, None]]
    engine = GradCAM(resnet)
    together = engine(inputs, "layer4", targets, ["gradcam++"] * 3)
    top1 = together.logits.argmax(dim=1).tolist()
    assert together.targets == [[1, 2, 3], [top1[1]], [500, top1[2]]]
    for i, image_targets in enumerate(targets):
        for j, target in enumerate(image_targets):
            alone = engine(inputs[i : i + 1], "layer4", [[target]], ["gradcam++"])
            assert torch.allclose(alone.cams[0][0], together.cams[i][j], atol=1e-5, rtol=0)


def test_the_api_offers_exactly_the_engine_methods() -> None:
    assert formula_methods() == METHODS


def test_no_hooks_and_no_parameter_gradients_after_a_call(resnet: nn.Module) -> None:
    engine = GradCAM(resnet)
    engine(torch.randn(2, 3, 64, 64), "layer4", [[None], [3]], ["gradcam", "layercam"])
    assert _hooks(resnet) == 0
    assert all(p.grad is None for p in resnet.parameters())
    assert not any(p.requires_grad for p in resnet.parameters())


def test_hooks_removed_when_the_call_raises(resnet: nn.Module) -> None:
    engine = GradCAM(resnet)
    with pytest.raises(TargetError):
        engine(torch.randn(1, 3, 64, 64), "layer4", [[1000]], ["gradcam"])
    assert _hooks(resnet) == 0
    with pytest.raises(RuntimeError):
        engine(torch.randn(1, 5, 64, 64), "layer4", [[None]], ["gradcam"])  # wrong channels
    assert _hooks(resnet) == 0
    with pytest.raises(LayerOutputError, match="more than once"):
        engine(torch.randn(1, 3, 64, 64), "layer4.1.relu", [[None]], ["gradcam"])
    with pytest.raises(LayerOutputError, match="not an"):
        engine(torch.randn(1, 3, 64, 64), "fc", [[None]], ["gradcam"])
    assert _hooks(resnet) == 0
    with pytest.raises(UnknownLayerError, match="layer4"):
        engine(torch.randn(1, 3, 64, 64), "layer5", [[None]], ["gradcam"])
    assert all(p.grad is None for p in resnet.parameters())
    # And the engine still works afterwards.
    engine(torch.randn(1, 3, 64, 64), "layer4", [[None]], ["gradcam"])


def test_works_inside_no_grad_and_inference_mode(resnet: nn.Module) -> None:
    engine = GradCAM(resnet)
    inputs = torch.randn(1, 3, 64, 64)
    expected = engine(inputs, "layer4", [[8]], ["gradcam"]).cams[0][0]
    with torch.no_grad():
        assert torch.equal(engine(inputs, "layer4", [[8]], ["gradcam"]).cams[0][0], expected)
    with torch.inference_mode():
        assert torch.equal(engine(inputs, "layer4", [[8]], ["gradcam"]).cams[0][0], expected)


@pytest.mark.parametrize("layer", ["features", "features.norm5", "features.denseblock4"])
def test_densenet_in_place_relu_after_the_layer(layer: str) -> None:
    # DenseNet applies F.relu(inplace=True) to `features`; the captured
    # activation must be the layer's real output and autograd must not object.
    model = seeded_model("densenet121")
    inputs = torch.randn(2, 3, 96, 96)
    out = GradCAM(model)(inputs, layer, [[3], [None]], ["gradcam"] * 2)
    assert all(torch.isfinite(c[0]).all() and c[0].shape == (3, 3) for c in out.cams)
    assert _hooks(model) == 0
    with torch.no_grad():
        assert torch.allclose(out.logits, model(inputs), atol=1e-4)


def test_one_channel_model() -> None:
    model = seeded_model("resnet18")
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model.requires_grad_(False).eval()
    out = GradCAM(model)(torch.randn(2, 1, 64, 64), "layer4", [[None], [2]], ["hirescam"] * 2)
    assert out.cams[0][0].shape == (2, 2)


def test_all_zero_map_is_zeros_not_nan() -> None:
    model = seeded_model("resnet18", num_classes=3)
    # Class 2 ignores the features entirely: its gradient, and so its map, is zero.
    fc = model.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    fc.weight[2] = 0
    for method in METHODS:
        out = GradCAM(model)(torch.randn(1, 3, 64, 64), "layer4", [[2]], [method])
        cam = out.cams[0][0]
        assert torch.equal(cam, torch.zeros_like(cam)), method


@pytest.mark.slow  # builds and probes a dozen torchvision models
def test_default_layer_of_common_architectures() -> None:
    expected = {
        "resnet18": "layer4",
        "densenet121": "features",
        "vgg11": "features",
        "mobilenet_v3_small": "features",
        "efficientnet_b0": "features",
    }
    for arch, layer in expected.items():
        model = seeded_model(arch)
        candidates = probe_layers(model, 3, (96, 96))
        assert default_layer(candidates, model) == layer, arch
        names = {c.name for c in candidates}
        assert "layer4.1.relu" not in names  # runs twice per block: not a candidate


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_steady_over_200_calls(runtime: Runtime) -> None:
    model = runtime.models[runtime.default_model]
    engine = GradCAM(model.module)
    inputs = torch.randn(4, 1, 128, 128)
    targets: list[list[int | None]] = [[None], [0, 1], [2], [3]]
    for _ in range(20):  # warm up allocator caches
        engine(inputs, "features", targets, ["gradcam"] * 4)
    gc.collect()
    before = _rss_bytes()
    for _ in range(200):
        engine(inputs, "features", targets, ["gradcam"] * 4)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 calls"
