"""Models of timm, Hugging Face transformers and MONAI served by a real server from one
models file: each answers ``/v1/explain`` with its own preprocessing, a non-zero map and
its library's labels, and its detail says where each preprocessing value came from."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import timm
import torch
import transformers
from safetensors.torch import save_file

from tests.helpers import LiveServer, ServerFactory, encode, phantom_png


@pytest.fixture(scope="module")
def served(
    module_live_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("libraries")
    torch.manual_seed(0)
    save_file(
        timm.create_model("resnet18", num_classes=3).state_dict(), str(folder / "r18.safetensors")
    )
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 64,
        "patch_size": 16,
        "num_labels": 2,
        "id2label": {0: "normal", 1: "nodule"},
        "label2id": {"normal": 0, "nodule": 1},
    }
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**settings))
    hf.save_pretrained(folder / "vit")
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder / "vit")
    (folder / "models.toml").write_text(
        textwrap.dedent(
            """
            [models.r18]
            library = "timm"
            arch = "resnet18"
            weights = "r18.safetensors"
            num_classes = 3
            default = true

            [models.hfvit]
            library = "transformers"
            arch = "vit"

            [models.cxr]
            library = "monai"
            arch = "DenseNet121"
            arch_args.in_channels = 1
            arch_args.out_channels = 2
            arch_args.init_features = 16
            arch_args.growth_rate = 8
            arch_args.block_config = [2, 2, 2, 2]
            input_size = [96, 96]
            """
        )
    )
    yield module_live_server(models_file=folder / "models.toml")


@pytest.mark.parametrize("model", ["r18", "hfvit", "cxr"])
def test_each_library_s_model_is_explained(served: LiveServer, model: str) -> None:
    answer = requests.post(
        f"{served.url}/v1/explain",
        json={
            "model": model,
            "images": [encode(phantom_png(3, 120, 100))],
            "heatmap": {"format": "array", "size": "layer"},
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    heat = np.asarray(result["explanations"][0]["heatmap"]["values"])
    assert heat.max() > 0
    assert sum(p["score"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_the_detail_says_where_each_preprocessing_value_came_from(served: LiveServer) -> None:
    details = {
        name: requests.get(f"{served.url}/v1/models/{name}", timeout=30).json()
        for name in ("r18", "hfvit", "cxr")
    }
    timm_model = details["r18"]
    assert timm_model["library"] == "timm" and timm_model["interpolation"] == "bicubic"
    assert timm_model["resize"] == "crop" and timm_model["scale_size"] is not None
    assert timm_model["sources"]["mean"] == "timm's data config"
    hf_model = details["hfvit"]
    assert hf_model["labels"] == ["normal", "nodule"] and hf_model["input_size"] == [64, 64]
    assert hf_model["sources"]["std"] == "the Hugging Face image processor"
    # Its processor's centre cut floors the offset where timm's rounds it.
    assert (hf_model["crop_offset"], timm_model["crop_offset"]) == ("floor", "round")
    assert hf_model["channel_order"] == "rgb"
    monai_model = details["cxr"]
    assert monai_model["channels"] == 1 and monai_model["mean"] == [0.0]
    assert monai_model["sources"]["input_size"] == "models file"
