"""A torch.export archive served by a real server: named in the models file, explained
through ``/v1/explain`` with a non-zero map, its detail saying where its input size came
from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torchvision

from tests.helpers import ServerFactory, encode, phantom_png


def _archive(folder: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    example = torch.randn(2, 3, 96, 96)
    batch = {"x": {0: torch.export.Dim("batch")}}
    torch.export.save(
        torch.export.export(model, (example,), dynamic_shapes=batch), folder / "m.pt2"
    )
    (folder / "labels.txt").write_text("normal\nnodule\n")
    (folder / "models.toml").write_text(
        '[models.exported]\nlibrary = "torch.export"\narch = "m.pt2"\nlabels = "labels.txt"\n'
    )


def test_an_exported_model_is_explained_by_the_server(
    live_server: ServerFactory, tmp_path: Path
) -> None:
    _archive(tmp_path)
    served = live_server(models_file=tmp_path / "models.toml")
    answer = requests.post(
        f"{served.url}/v1/explain",
        json={
            "images": [encode(phantom_png(3, 120, 100))],
            "heatmap": {"format": "array", "size": "layer"},
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    heat = np.asarray(result["explanations"][0]["heatmap"]["values"])
    assert heat.shape == (3, 3) and heat.max() > 0
    assert {p["label"] for p in result["predictions"]} == {"normal", "nodule"}
    assert sum(p["score"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-4)
    detail = requests.get(f"{served.url}/v1/models/exported", timeout=30).json()
    assert detail["library"] == "torch.export" and detail["input_size"] == [96, 96]
    assert detail["sources"]["input_size"] == "the exported program's input"
    assert detail["default_layer"] == "layer4"
