"""A real ViT-B/16 served by the real server: its layers listed as token grids and its maps
at the grid's 14 × 14 (the transformers themselves:
tests/unit/engine/test_transformers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers import ServerFactory, encode, phantom_png
from tests.unit.engine.test_transformers import _models_file


@pytest.mark.slow
def test_vit_b_16_served_over_http(live_server: ServerFactory, tmp_path: Path) -> None:
    path = _models_file(
        tmp_path,
        """
        [models.vit]
        arch = "vit_b_16"
        memory_format = "contiguous"  # no timed probe at start-up
        """,
    )
    server = live_server(models_file=path)
    layers = requests.get(f"{server.url}/v1/models/vit/layers", timeout=10).json()
    assert layers["default_layer"] == "encoder.layers.encoder_layer_11.ln_1"
    assert {
        "name": "encoder.layers.encoder_layer_11.ln_1",
        "kind": "LayerNorm",
        "channels": 768,
        "height": 14,
        "width": 14,
    } in layers["layers"]
    response = requests.post(
        f"{server.url}/v1/explain",
        json={
            "images": [encode(phantom_png(3, 300, 240))],
            "heatmap": {"format": "array", "size": "layer"},
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["layer"] == "encoder.layers.encoder_layer_11.ln_1"
    heatmap = body["results"][0]["explanations"][0]["heatmap"]
    assert (heatmap["width"], heatmap["height"]) == (14, 14)
    assert np.array(heatmap["values"]).shape == (14, 14)
