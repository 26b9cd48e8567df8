"""On a CUDA device: the same heatmaps as on the CPU, autocast's difference, the server.

Marked ``gpu``: skipped where CUDA is missing; ``tests/benchmarks/gpu_check.sh``
runs them on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests
import torch

from service.engine.gradcam import METHODS, GradCAM
from tests.conftest import LiveServer, encode, phantom_png, seeded_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    cpu = seeded_model("resnet50")
    gpu = seeded_model("resnet50").cuda()
    return cpu, gpu


@pytest.mark.parametrize("method", METHODS)
def test_cuda_maps_equal_cpu_maps(models: tuple[torch.nn.Module, torch.nn.Module],
                                  method: str) -> None:
    cpu, gpu = models
    torch.manual_seed(0)
    inputs = torch.randn(32, 3, 224, 224)
    targets: list[list[int | None]] = [[None]] * 16 + [[i * 50] for i in range(16)]
    on_cpu = GradCAM(cpu)(inputs, "layer4", targets, [method] * 32)
    on_gpu = GradCAM(gpu, "cuda")(inputs.pin_memory(), "layer4", targets, [method] * 32)
    assert on_gpu.logits.device.type == "cpu"  # one copy back
    for a, b in zip(on_cpu.cams, on_gpu.cams, strict=True):
        scale = float(a[0].abs().max()) or 1.0
        assert torch.allclose(a[0], b[0], atol=1e-3 * scale, rtol=1e-3)


def test_autocast_heatmaps_stay_close(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    _, gpu = models
    torch.manual_seed(1)
    inputs = torch.randn(32, 3, 224, 224)
    targets: list[list[int | None]] = [[None]] * 32
    full = GradCAM(gpu, "cuda")(inputs, "layer4", targets, ["gradcam"] * 32)
    half = GradCAM(gpu, "cuda", autocast=True)(inputs, "layer4", targets, ["gradcam"] * 32)
    correlations, differences = [], []
    for a, b in zip(full.cams, half.cams, strict=True):
        x, y = a[0].numpy().ravel(), b[0].numpy().ravel()
        if x.max() > 0:
            correlations.append(float(np.corrcoef(x, y)[0, 1]))
            differences.append(float(np.abs(x / x.max() - y / max(y.max(), 1e-12)).max()))
    print(f"autocast vs float32: min Pearson {min(correlations):.5f}, "
          f"max normalised difference {max(differences):.4f}")
    assert min(correlations) >= 0.99


def test_batch_invariance_on_cuda(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    _, gpu = models
    torch.manual_seed(2)
    inputs = torch.randn(8, 3, 224, 224)
    engine = GradCAM(gpu, "cuda")
    batch = engine(inputs, "layer4", [[i] for i in range(8)], ["gradcam"] * 8)
    for i in range(8):
        alone = engine(inputs[i:i + 1], "layer4", [[i]], ["gradcam"])
        assert torch.allclose(alone.cams[0][0], batch.cams[i][0], atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def cuda_server() -> Iterator[LiveServer]:
    live = LiveServer(device="cuda")
    yield live
    live.stop()


def test_server_on_cuda(cuda_server: LiveServer) -> None:
    detail = requests.get(f"{cuda_server.url}/v1/models/phantom", timeout=10).json()
    assert detail["device"].startswith("cuda")
    response = requests.post(f"{cuda_server.url}/v1/explain", timeout=60, json={
        "images": [encode(phantom_png(2, 300, 240))], "heatmap": {"format": "overlay"}})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["predictions"][0]["label"] == "nodule"
    assert (result["explanations"][0]["heatmap"]["width"],
            result["explanations"][0]["heatmap"]["height"]) == (300, 240)
