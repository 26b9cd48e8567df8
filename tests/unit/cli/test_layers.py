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


def test_layers_knows_a_timm_vit_and_refuses_its_per_head_norms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A timm ViT, its layout known without a declaration: its grid from its own patch
    embedding at 48×64, and its per-head query and key norms refused, with the reason."""
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.vit]\narch = "tests.library_models:timm_vit"\n'
        'input_size = [48, 64]\nmemory_format = "contiguous"\n'
    )
    assert main(["layers", "--models", str(path)]) == 0
    out = capsys.readouterr().out
    assert "* blocks.1.norm1" in out and "24×3×4  (from tokens)" in out
    listed, _, refused = out.partition("not offered, and why:\n")
    assert "q_norm" not in listed
    line = next(line for line in refused.splitlines() if "blocks.1.attn.q_norm" in line)
    assert line.startswith("- blocks.1.attn.q_norm ") and line.endswith(
        "returns (N, 2, 13, 12) inside a token model: per-head attention "
        "(N, heads, tokens, dim), not a map"
    )


def test_a_volume_model_s_shapes_have_a_depth() -> None:
    """A volume model's input and maps are C×D×H×W (they were printed as C×H×W, and a
    3-D layer's layout stopped the command); a 2-D layer keeps its C×H×W."""
    from service.cli.layers import input_shape, layer_shape
    from service.transport.interface import LayerInfo, ModelInfo

    block = LayerInfo("features.denseblock3", "_DenseBlock", 30, 3, 2, "ncdhw", depth=3)
    model = ModelInfo(
        "ct3d",
        "DenseNet",
        ("a", "b"),
        False,
        1,
        (48, 48, 32),
        (0.0,),
        (1.0,),
        "stretch",
        block.name,
        (block,),
        (block.name,),
        "cpu",
    )
    assert input_shape(model) == "1×48×48×32"
    assert layer_shape(block) == "30×3×3×2"
    assert layer_shape(LayerInfo("features", "Conv2d", 128, 16, 16)) == "128×16×16"
    assert layer_shape(LayerInfo("blocks.1", "Block", 64, 14, 14, "tokens")) == (
        "64×14×14  (from tokens)"
    )
