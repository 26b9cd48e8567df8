"""gradcam-service layers: the model's layers with their shapes, the default marked, and
the layers not offered with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main


def test_layers_lists_shapes_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "* features " in out and "128×16×16" in out
    assert "features.stage2" in out


def test_layers_says_why_a_layer_is_not_offered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.vit]\narch = "tests.tiny_transformers:tiny_vit"\n'
        'input_size = [32, 32]\nmemory_format = "contiguous"\n'
    )
    assert main(["layers", "--models", str(path)]) == 0
    listed, _, refused = capsys.readouterr().out.partition("not offered, and why:\n")
    assert "* encoder.layers.encoder_layer_1.ln_1" in listed and "self_attention" not in listed
    # torch's MultiheadAttention returns (output, weights).
    assert refused.splitlines() == [
        f"- encoder.layers.encoder_layer_{i}.self_attention  MultiheadAttention   "
        "returns a tuple of 2, not a tensor"
        for i in range(2)
    ]
