"""The engine on volumes: 5-D activations, every formula over all three spatial axes,
against MONAI's GradCAM and GradCAMpp and pytorch-grad-cam's 3-D Grad-CAM on the same
tensor; batch norms folded and NDHWC inputs change nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from service.contract.terms import METHODS
from service.engine.folding import fold_batch_norms
from service.engine.gradcam import GradCAM, cam_formula

monai_nets = pytest.importorskip("monai.networks.nets")
monai_visualize = pytest.importorskip("monai.visualize")

LAYER = "features.denseblock3"
TARGETS = [0, 1, 2, 1]


def _calibrated(net: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Batch norms given the statistics of ``inputs`` (a random net's activations vanish
    layer by layer otherwise, and its maps are zero), and affine parameters off 1/0."""
    generator = torch.Generator().manual_seed(2)
    net.train()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.momentum = None  # a plain average over the calls
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) * 0.4)
        net(inputs)
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def volumes() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 1, 6, 6, 6, generator=generator)
    return nn.functional.interpolate(coarse, size=(64, 56, 48), mode="trilinear")


@pytest.fixture(scope="module")
def net(volumes: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = monai_nets.DenseNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        init_features=8,
        growth_rate=8,
        block_config=(2, 2, 2),
    )
    return _calibrated(model, volumes)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _with_grad(net: nn.Module) -> nn.Module:
    """A copy whose parameters require grad: MONAI's and pytorch-grad-cam's CAMs call
    ``backward`` and need a graph from the input."""
    copied = copy.deepcopy(net)
    for parameter in copied.parameters():
        parameter.requires_grad_(True)
    return copied


def _paper_gradcam_pp(acti: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Grad-CAM++ as Chattopadhay et al. write it (eq. 19, with the exponential score's
    closed form), over the three spatial axes, written out here in numpy: α = g² /
    (2g² + ΣA·g³), weights = Σ α·relu(g)."""
    g2, g3 = grad**2, grad**3
    denominator = 2 * g2 + acti.sum(axis=(1, 2, 3), keepdims=True) * g3
    alpha = np.where(denominator != 0, g2 / np.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * np.maximum(grad, 0)).sum(axis=(1, 2, 3), keepdims=True)
    return np.maximum((weights * acti).sum(axis=0), 0)


def _monai_maps(
    net: nn.Module, volumes: torch.Tensor, reference: str
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """MONAI's map of each volume's target at the layer grid, with the activation and
    gradient its own hooks captured."""
    cam = getattr(monai_visualize, reference)(_with_grad(net), target_layers=LAYER)
    found = []
    for i, target in enumerate(TARGETS):
        volume = volumes[i : i + 1]
        expected = cam.compute_map(volume, class_idx=target)[0, 0].detach().numpy()
        _, acti, grad = cam.nn_module(volume, class_idx=target)
        found.append((expected, acti[0][0].detach().numpy(), grad[0][0].detach().numpy()))
    return found


def _compared(ours: list[np.ndarray], references: list[np.ndarray], minimum: float) -> None:
    informative = 0
    for i, (mine, expected) in enumerate(zip(ours, references, strict=True)):
        assert mine.shape == expected.shape == (4, 3, 3)
        if expected.max() <= 0:
            assert mine.max() <= 1e-6
            continue
        informative += 1
        assert _pearson(mine, expected) >= minimum, (i, _pearson(mine, expected))
    assert informative >= 3


def test_gradcam_equals_monai_at_the_layer_grid(net: nn.Module, volumes: torch.Tensor) -> None:
    batch = GradCAM(net)(volumes, LAYER, [[t] for t in TARGETS], ["gradcam"] * len(TARGETS))
    found = _monai_maps(net, volumes, "GradCAM")
    _compared([c[0].numpy() for c in batch.cams], [f[0] for f in found], 0.999)


def test_gradcam_pp_is_the_paper_s_on_monai_s_captures(
    net: nn.Module, volumes: torch.Tensor
) -> None:
    """MONAI's GradCAMpp writes the alpha's denominator as 2g² + Σ(A·g³), one sum per
    channel, where the paper, pytorch-grad-cam and we have 2g² + ΣA·g³ (the activations'
    sum times each cell's g³): ours equals the paper's formula on the activation and
    gradient MONAI's own hooks capture, and stays close to MONAI's variant (docs)."""
    batch = GradCAM(net)(volumes, LAYER, [[t] for t in TARGETS], ["gradcam++"] * len(TARGETS))
    found = _monai_maps(net, volumes, "GradCAMpp")
    ours = [c[0].numpy() for c in batch.cams]
    _compared(ours, [_paper_gradcam_pp(acti, grad) for _, acti, grad in found], 0.9999)
    _compared(ours, [f[0] for f in found], 0.98)


def test_gradcam_equals_pytorch_grad_cam_3d_at_the_layer_grid(
    net: nn.Module, volumes: torch.Tensor
) -> None:
    """pytorch-grad-cam's 3-D Grad-CAM, read at the layer's grid: it resizes with
    scipy's cubic, corner-aligned zoom where MONAI and we interpolate trilinearly with
    half-pixel centres (Pearson 0.92 at the input size on this net), so the maps are
    compared before either resize."""
    reference = pytest.importorskip("pytorch_grad_cam")
    targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

    class AtTheLayer(reference.GradCAM):  # type: ignore[misc, name-defined]
        def get_target_width_height(self, input_tensor: torch.Tensor) -> None:
            return None  # scale_cam_image then only normalises

    theirs_net = _with_grad(net)
    cam = AtTheLayer(theirs_net, target_layers=[theirs_net.get_submodule(LAYER)])
    theirs = cam(volumes, [targets_module.ClassifierOutputTarget(t) for t in TARGETS])
    batch = GradCAM(net)(volumes, LAYER, [[t] for t in TARGETS], ["gradcam"] * len(TARGETS))
    compared = 0
    for i in range(len(TARGETS)):
        ours = batch.cams[i][0].numpy()
        assert theirs[i].shape == ours.shape
        if ours.max() <= 0:
            continue
        compared += 1
        assert _pearson(ours, theirs[i]) >= 0.999
    assert compared >= 3


@pytest.mark.parametrize("method", METHODS)
def test_every_formula_reduces_over_all_three_axes(method: str) -> None:
    """A formula over (D, H, W) is the same formula over the flattened (D·H, W): each
    reduces over every spatial axis, so how the axes are cut cannot matter."""
    generator = torch.Generator().manual_seed(4)
    a = torch.rand(2, 5, 3, 4, 6, generator=generator)
    g = torch.randn(2, 5, 3, 4, 6, generator=generator)
    formula = cam_formula(method)
    volume_map = formula(a, g)
    flat_map = formula(a.reshape(2, 5, 12, 6), g.reshape(2, 5, 12, 6))
    assert volume_map.shape == (2, 3, 4, 6)
    torch.testing.assert_close(volume_map.reshape(2, 12, 6), flat_map, rtol=1e-5, atol=1e-6)


def test_every_method_runs_on_a_volume_batch(net: nn.Module, volumes: torch.Tensor) -> None:
    batch = GradCAM(net)(volumes, LAYER, [[0], [1, 2], [None], [2]], list(METHODS[:4]))
    assert batch.targets[2] == [int(batch.logits[2].argmax())]
    assert [len(c) for c in batch.cams] == [1, 2, 1, 1]
    assert all(cam.shape == (4, 3, 3) and cam.min() >= 0 for c in batch.cams for cam in c)


def test_folded_3d_batch_norms_and_ndhwc_give_the_same_maps(
    net: nn.Module, volumes: torch.Tensor
) -> None:
    plain = GradCAM(net)(volumes, LAYER, [[t] for t in TARGETS], ["gradcam"] * 4)
    folded_net = copy.deepcopy(net)
    assert "features.conv0" in fold_batch_norms(folded_net)  # conv0 → norm0
    folded = GradCAM(folded_net)(volumes, LAYER, [[t] for t in TARGETS], ["gradcam"] * 4)
    ndhwc_net = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    ndhwc = GradCAM(ndhwc_net, channels_last=True)(
        volumes, LAYER, [[t] for t in TARGETS], ["gradcam"] * 4
    )
    for other in (folded, ndhwc):
        torch.testing.assert_close(other.logits, plain.logits, rtol=1e-4, atol=1e-4)
        for i in range(4):
            a, b = plain.cams[i][0], other.cams[i][0]
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.max() + 1e-9))


def test_the_bf16_check_runs_on_a_volume_model(net: nn.Module) -> None:
    """The precision check at load (tuning.py) compares a volume model's bfloat16 maps
    with its float32 ones as it does an image model's: probe volumes, a verdict and its
    figures (this small random net may pass or fail it; either is a valid answer)."""
    from service.engine.tuning import Probe, choose_precision, probe_inputs

    device = torch.device("cpu")
    probe = Probe(net, device, probe_inputs(1, (32, 32, 24), device), LAYER)
    assert probe.inputs.shape == (4, 1, 32, 32, 24)
    precision, fell_back, why = choose_precision(probe, "bf16", False, False)
    assert (precision, fell_back) in (("bf16", False), ("fp32", True))
    assert "Pearson" in why
