"""How a model runs, chosen at load (``engine/tuning.py``): channels_last by a timed probe
with identical maps, bfloat16 only after its check against float32, the fallback said."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from service import metrics
from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.engine import tuning
from service.engine.gradcam import GradCAM
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from tests.helpers import REPO, as_json, encode, phantom_png


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:  # a flat map (all zero): agree only if both are
        return 1.0 if np.allclose(a, b, atol=1e-3) else 0.0
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


DEMO = REPO / "service" / "demo" / "models.toml"


def _runtime(folder: Path, **options: str) -> Runtime:
    """The demo model with ``options`` added to its table."""
    folder.mkdir(parents=True, exist_ok=True)
    text = DEMO.read_text().replace(
        '"phantom_net.safetensors"', f'"{DEMO.parent / "phantom_net.safetensors"}"'
    )
    text = text.replace('"labels.txt"', f'"{DEMO.parent / "labels.txt"}"')
    text = "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("memory_format")
    )  # each test sets its own
    text += "".join(f'{key} = "{value}"\n' for key, value in options.items())
    (folder / "models.toml").write_text(text)
    return Runtime(Settings(models_file=folder / "models.toml", device="cpu")).start()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)


def test_channels_last_gives_the_same_maps(resnet: torch.nn.Module) -> None:
    inputs = tuning.probe_inputs(3, (96, 96), torch.device("cpu"))
    plain = GradCAM(resnet, "cpu")(inputs, "layer3", [[None]] * 4, ["gradcam"] * 4)
    resnet.to(memory_format=torch.channels_last)
    try:
        nhwc = GradCAM(resnet, "cpu", channels_last=True)(
            inputs, "layer3", [[None]] * 4, ["gradcam"] * 4
        )
    finally:
        resnet.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(nhwc.logits, plain.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(plain.cams, nhwc.cams, strict=True):
        assert _pearson(a[0].numpy(), b[0].numpy()) > 0.99999


def test_the_probe_keeps_the_faster_format(
    resnet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tuning.probe_inputs(3, (64, 64), torch.device("cpu"))
    # Whatever the timings, the model is left in the format that was chosen.
    probe = tuning.Probe(resnet, torch.device("cpu"), inputs, "layer4")
    chosen, why = tuning.choose_memory_format(probe, "auto")
    conv1 = resnet.get_submodule("conv1")
    assert isinstance(conv1, torch.nn.Conv2d)
    assert conv1.weight.is_contiguous(memory_format=torch.channels_last) == chosen
    assert "probe images" in why
    # Told which, it does as told.
    assert tuning.choose_memory_format(probe, "contiguous") == (False, "set in the models file")
    resnet.to(memory_format=torch.contiguous_format)
    # A format that is never faster is not kept.
    clock = iter([0.0, 1.0, 1.0, 3.0] * 10)  # contiguous 1 s, channels_last 2 s, ...
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: next(clock))
    chosen, _ = tuning.choose_memory_format(probe, "auto")
    assert not chosen and conv1.weight.is_contiguous()


@pytest.mark.slow
def test_bf16_is_checked_against_fp32_and_answers_close(tmp_path: Path) -> None:
    fp32 = _runtime(tmp_path / "fp32", memory_format="contiguous")
    bf16 = _runtime(tmp_path / "bf16", precision="bf16", memory_format="contiguous")
    try:
        assert bf16.catalog().get("phantom").precision == "bf16"
        assert fp32.catalog().get("phantom").precision == "fp32"
        images = [encode(phantom_png(seed, 128, 128)) for seed in range(8)]
        request = ExplainRequest.model_validate(
            {"images": images, "heatmap": {"format": "array", "size": "layer"}}
        )
        a, b = (as_json(explain(request, rt, rt.settings)) for rt in (fp32, bf16))
        assert a["precision"] == "fp32" and b["precision"] == "bf16"
        for x, y in zip(a["results"], b["results"], strict=True):
            assert x["predictions"][0]["index"] == y["predictions"][0]["index"]
            assert abs(x["predictions"][0]["score"] - y["predictions"][0]["score"]) <= 0.01
            mx = np.asarray(x["explanations"][0]["heatmap"]["values"])
            my = np.asarray(y["explanations"][0]["heatmap"]["values"])
            assert _pearson(mx, my) >= 0.999
    finally:
        fp32.close()
        bf16.close()


def test_a_model_that_fails_the_check_runs_in_fp32(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning, "MIN_PEARSON", 1.5)  # no map can pass
    before = metrics.PRECISION_FALLBACKS.labels("phantom")._value.get()
    with caplog.at_level(logging.WARNING):
        runtime = _runtime(tmp_path, precision="bf16", memory_format="contiguous")
    try:
        assert runtime.catalog().get("phantom").precision == "fp32"
        assert metrics.PRECISION_FALLBACKS.labels("phantom")._value.get() == before + 1
        assert any(
            "runs in float32" in r.message and "failed its check" in r.message
            for r in caplog.records
        )
    finally:
        runtime.close()


def test_auto_takes_bf16_only_where_the_hardware_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning, "native_bf16", lambda device: False)
    runtime = _runtime(tmp_path, precision="auto", memory_format="contiguous")
    try:
        assert runtime.catalog().get("phantom").precision == "fp32"
    finally:
        runtime.close()
    monkeypatch.setattr(tuning, "native_bf16", lambda device: True)
    runtime = _runtime(tmp_path / "again", precision="auto", memory_format="contiguous")
    try:
        assert runtime.catalog().get("phantom").precision == "bf16"
    finally:
        runtime.close()
