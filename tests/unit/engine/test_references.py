"""Our heatmaps against independent implementations: Captum and pytorch-grad-cam.

Seeded random-init torchvision models, a batch of 4 images with 4 different
targets, compared per image at the target layer's resolution.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam import GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from service.engine.gradcam import GradCAM
from service.engine.layers import resolve_layer
from tests.helpers import seeded_model

CASES = [("resnet18", "layer4"), ("densenet121", "features.denseblock4"), ("vgg11", "features")]
REFERENCE_CLASSES = {
    "gradcam": ReferenceGradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _assert_same_maps(ours: np.ndarray, reference: np.ndarray, minimum: float) -> None:
    """Pearson ≥ ``minimum`` per image; a map that is all zero must be zero in both."""
    informative = 0
    for i in range(len(ours)):
        if reference[i].max() <= 0:
            assert ours[i].max() <= 1e-6 * max(1.0, float(np.abs(ours).max())), i
            continue
        informative += 1
        r = _pearson(ours[i], reference[i])
        assert r >= minimum, f"image {i}: Pearson {r:.5f} < {minimum}"
    # The comparison is only meaningful if most maps are not trivially zero.
    assert informative >= 3


@pytest.fixture(
    scope="module",
    params=[
        # DenseNet-121's and VGG-11's 224² maps cost a second or more per method: out of
        # the developer loop (ResNet-18 stays in it).
        pytest.param(c, marks=pytest.mark.slow) if c[0] != "resnet18" else c
        for c in CASES
    ],
    ids=[arch for arch, _ in CASES],
)
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    arch, layer = request.param
    model = seeded_model(arch)
    torch.manual_seed(1)
    inputs = torch.randn(4, 3, 224, 224)
    # The references need a model whose parameters require grad (they call .backward()).
    reference_model = copy.deepcopy(model).requires_grad_(True)
    # Four different targets: for each image in turn, its highest-scoring class not
    # yet taken. (A random-init model's low-scoring classes often have all-zero
    # maps, which would compare nothing.)
    with torch.no_grad():
        logits = model(inputs)
    targets: list[int] = []
    for row in logits:
        targets.append(next(int(c) for c in row.argsort(descending=True) if int(c) not in targets))
    return {
        "arch": arch,
        "layer": layer,
        "model": model,
        "reference": reference_model,
        "inputs": inputs,
        "targets": targets,
    }


def _ours(case: dict[str, Any], method: str) -> np.ndarray:
    engine = GradCAM(case["model"])
    targets = case["targets"]
    out = engine(case["inputs"], case["layer"], [[t] for t in targets], [method] * 4)
    assert out.targets == [[t] for t in targets]
    return torch.stack([cams[0] for cams in out.cams]).numpy()


def _pytorch_grad_cam(case: dict[str, Any], method: str) -> np.ndarray:
    layer = resolve_layer(case["reference"], case["layer"])
    cam = REFERENCE_CLASSES[method](model=case["reference"], target_layers=[layer])
    try:
        cam(case["inputs"], [ClassifierOutputTarget(t) for t in case["targets"]])
        # Its maps before it resizes them to the input: same resolution as ours.
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(case["inputs"], layer, None, activations, gradients, False)
    finally:
        cam.activations_and_grads.release()
    return np.maximum(raw, 0)


def test_gradcam_matches_captum(case: dict[str, Any]) -> None:
    layer = resolve_layer(case["reference"], case["layer"])
    reference = (
        LayerGradCam(case["reference"], layer)
        .attribute(case["inputs"], target=case["targets"], relu_attributions=True)
        .detach()[:, 0]
        .numpy()
    )
    _assert_same_maps(_ours(case, "gradcam"), reference, 0.999)


@pytest.mark.parametrize("method", list(REFERENCE_CLASSES))
def test_methods_match_pytorch_grad_cam(case: dict[str, Any], method: str) -> None:
    minimum = 0.999 if method == "gradcam" else 0.99
    _assert_same_maps(_ours(case, method), _pytorch_grad_cam(case, method), minimum)
