"""The model matrix (tests/model_matrix.py, docs/models.md) through one real server: 26
timm families, 12 Hugging Face families and 5 MONAI networks, seeded, written as their
libraries write them and named in one models file with no layout declared (but for
MONAI's ViT, which no library attribute describes).

For each, on one picture: the server's scores are the model's own on the picture as
its library preprocesses it (timm's ``create_transform``, the Hugging Face image
processor, MONAI's [0, 1]), so the preprocessing agrees too; its map at the default
layer's grid has Pearson >= 0.999 with pytorch-grad-cam's, on that layer of the
unfolded eager model with the reshape its family needs; five methods on a subset.

``GRADCAM_MATRIX_TABLE=path`` writes the table of docs/models.md.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from torch import Tensor, nn

from service.engine.layers import resolve_layer
from tests.helpers import LiveServer, ServerFactory, encode
from tests.model_matrix import (
    CLASSES,
    ENTRIES,
    Entry,
    build_reference,
    matrix_image,
    preprocess,
    reference_layer,
    reshape_for,
    write,
)
from tests.unit.engine.test_transformers import reference_maps

pytestmark = pytest.mark.slow
MIN_PEARSON = 0.999
SCORE_TOLERANCE = 2e-4  # folded batch norms, channels_last and another summation order


@dataclass
class Matrix:
    live: LiveServer
    folder: Path
    references: dict[str, torch.nn.Module]
    rows: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def matrix(
    module_live_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Matrix]:
    folder = tmp_path_factory.mktemp("matrix")
    references = {entry.name: build_reference(entry) for entry in ENTRIES}
    blocks = [write(entry, references[entry.name], folder) for entry in ENTRIES]
    (folder / "models.toml").write_text("\n".join(blocks))
    # Loading 43 models and probing their layers takes a while on 2 cores.
    live = module_live_server(models_file=folder / "models.toml", ready_s=300)
    served = Matrix(live, folder, references)
    yield served
    if table := os.environ.get("GRADCAM_MATRIX_TABLE"):
        Path(table).write_text("\n".join(served.rows) + "\n")


def _png(entry: Entry) -> bytes:
    buffer = io.BytesIO()
    matrix_image(entry).save(buffer, format="PNG")
    return buffer.getvalue()


def _explain(live: LiveServer, entry: Entry, target: int, method: str) -> dict[str, object]:
    answer = requests.post(
        f"{live.url}/v1/explain",
        json={
            "model": entry.name,
            "images": [encode(_png(entry))],
            "targets": [target],
            "method": method,
            "top_k": CLASSES,
            "heatmap": {"format": "array", "size": "layer"},
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text[:500]
    body: dict[str, object] = answer.json()
    return body


def _reference(
    model: nn.Module, entry: Entry, layer: str, pixels: Tensor, target: int, method: str
) -> np.ndarray:
    """pytorch-grad-cam's map before it resizes it, with the family's reshape."""
    module = resolve_layer(model, reference_layer(entry, layer))
    model.requires_grad_(True)  # its backward needs a graph, whatever the layer holds
    try:
        maps = reference_maps(model, module, pixels, [target], reshape_for(entry, model), [method])
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return maps[method]


def _pearson(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    assert _varies(reference), f"the reference map is flat: {reference}"
    return float(np.corrcoef(ours.ravel(), reference.ravel())[0, 1])


def _default_layer(live: LiveServer, entry: Entry) -> str:
    detail = requests.get(f"{live.url}/v1/models/{entry.name}", timeout=30).json()
    return str(detail["default_layer"])


def _varies(cam: np.ndarray) -> bool:
    """A map that says something: not all 0, not one value in every cell (a net whose
    activations vanish gives one: EfficientNet's at 1e-27 before its norms were
    calibrated; its Pearson is NaN). Its scale is the head's: BEiT's is 1e-3 of a
    ViT's, its maps vary by 1e-7."""
    return bool(cam.max() > 0 and cam.std() > 1e-4 * cam.max())


def _explained_class(
    model: nn.Module, entry: Entry, layer: str, pixels: Tensor, scores: np.ndarray
) -> int:
    """The top-1 class, unless its Grad-CAM map is flat (negative in every cell, all 0
    after the ReLU: a random net may do that, and then nothing would be compared); then
    the next class by score whose map is not."""
    for target in np.argsort(-scores):
        if _varies(_reference(model, entry, layer, pixels, int(target), "gradcam")):
            return int(target)
    raise AssertionError(f"{entry.name}: every class's map at {layer} is all zero")


@pytest.mark.parametrize("entry", ENTRIES, ids=[entry.name for entry in ENTRIES])
def test_the_server_explains_it_as_pytorch_grad_cam_does(matrix: Matrix, entry: Entry) -> None:
    model = matrix.references[entry.name]
    pixels = preprocess(entry, model, matrix_image(entry), matrix.folder)
    with torch.no_grad():
        own = torch.softmax(model(pixels), dim=1)[0].numpy()
    layer = _default_layer(matrix.live, entry)
    target = _explained_class(model, entry, layer, pixels, own)

    found: dict[str, float] = {}
    seconds = 0.0
    for method in entry.methods:
        started = time.monotonic()
        body = _explain(matrix.live, entry, target, method)
        seconds = seconds or time.monotonic() - started
        result = body["results"][0]  # type: ignore[index]
        scores = np.zeros(CLASSES)
        for prediction in result["predictions"]:
            scores[prediction["index"]] = prediction["score"]
        np.testing.assert_allclose(scores, own, atol=SCORE_TOLERANCE)
        ours = np.asarray(result["explanations"][0]["heatmap"]["values"])[None]
        assert body["layer"] == layer
        reference = _reference(model, entry, layer, pixels, target, method)
        found[method] = _pearson(ours, reference)
    grid = "×".join(str(n) for n in ours.shape[1:])
    matrix.rows.append(
        f"| {entry.library} | {entry.family} | `{entry.arch or entry.hf[1]}` | `{layer}` | "  # type: ignore[index]
        f"{grid} | {', '.join(f'{m} {r:.4f}' for m, r in found.items())} | "
        f"{seconds * 1000:.0f} ms |"
    )
    low = {method: r for method, r in found.items() if not r >= MIN_PEARSON}  # NaN too
    assert not low, f"Pearson below {MIN_PEARSON}: {low}"
