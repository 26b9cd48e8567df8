"""Faithfulness (deletion and insertion, engine/faithfulness.py): each piece against an
independent computation (SciPy's Gaussian filter, NumPy's stable sort, the model called
directly), the answer through the explain path, and ground truth on the demo model:
Grad-CAM's maps must beat a random map and a centred blob on the phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from service.contract.errors import PayloadTooLarge
from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.demo.phantom import FINDINGS
from service.engine import faithfulness as engine_faithfulness
from service.engine.runtime import Runtime
from service.imaging.values import to_uint8
from service.pipeline.explain import explain
from service.pipeline.faithfulness import auc
from service.transport.interface import Job
from tests.helpers import as_json, encode, phantom, phantom_png

STEPS = engine_faithfulness.STEPS


def test_the_blur_is_scipys_gaussian_filter() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((2, 3, 40, 57)).astype(np.float32)
    ours = engine_faithfulness.gaussian_blur(torch.from_numpy(image)).numpy()
    # σ = 5, radius ⌈3σ⌉ = 15 (truncate 3), edges replicated ("nearest"), per channel.
    theirs = gaussian_filter(image, sigma=(0, 0, 5, 5), truncate=3.0, mode="nearest")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_masks_follow_the_ranking_and_break_ties_by_pixel_index() -> None:
    cam = torch.zeros(4, 4)
    cam[3, 3] = 1.0  # the highest value: first to go
    masks = engine_faithfulness.step_masks(cam, (8, 8), steps=4)
    assert masks.shape == (5, 1, 8, 8)
    assert [int(m.sum()) for m in masks] == [0, 16, 32, 48, 64]
    flat = torch.nn.functional.interpolate(
        cam[None, None], size=(8, 8), mode="bilinear", align_corners=False
    ).flatten()
    expected = np.argsort(-flat.numpy(), kind="stable")[:16]
    assert sorted(np.flatnonzero(masks[1].flatten().numpy())) == sorted(expected)
    # A flat map ranks in pixel order: the first quarter is the first two rows.
    flat_masks = engine_faithfulness.step_masks(torch.ones(2, 2), (8, 8), steps=4)
    assert flat_masks[1, 0, :2].all() and not flat_masks[1, 0, 2:].any()


def test_auc_is_the_trapezoid_rule() -> None:
    curve = np.linspace(1, 0, STEPS + 1) ** 2
    assert auc(curve) == pytest.approx(np.trapezoid(curve, np.linspace(0, 1, STEPS + 1)))
    assert auc(np.ones(STEPS + 1)) == pytest.approx(1.0)


def _explain(runtime: Runtime, **body: object) -> dict:
    return as_json(explain(ExplainRequest.model_validate(body), runtime, runtime.settings))


def _recomputed(runtime: Runtime, image: np.ndarray, layer_map: np.ndarray, target: int) -> tuple:
    """The definition, computed here from the model and NumPy/SciPy, not the engine's code."""
    model = runtime.models["phantom"]
    x = (image.astype(np.float32) / 255.0 - model.mean[0]) / model.std[0]
    blurred = gaussian_filter(x, sigma=5, truncate=3.0, mode="nearest")
    up = torch.nn.functional.interpolate(
        torch.from_numpy(layer_map)[None, None].float(),
        size=x.shape,
        mode="bilinear",
        align_corners=False,
    ).flatten()
    order = np.argsort(-up.numpy(), kind="stable")
    n = x.size
    deletion, insertion = [], []
    for k in range(STEPS + 1):
        flat = np.zeros(n, dtype=bool)
        flat[order[: round(k * n / STEPS)]] = True
        top = flat.reshape(x.shape)
        deletion.append(np.where(top, blurred, x))
        insertion.append(np.where(top, x, blurred))
    batch = torch.from_numpy(np.stack(deletion + insertion)[:, None]).float()
    with torch.no_grad():
        scores = torch.sigmoid(model.module(batch))[:, target].numpy()  # multi-label: sigmoid
    return scores[: STEPS + 1], scores[STEPS + 1 :]


def test_the_answer_carries_the_curves_as_defined(runtime: Runtime) -> None:
    pictures = [phantom(seed, 128, 128) for seed in (3, 11)]
    body = _explain(
        runtime,
        images=[encode(phantom_png(seed, 128, 128)) for seed in (3, 11)],
        targets=[["nodule", "mass"], None],
        include=["faithfulness"],
        heatmap={"format": "array", "size": "layer"},
    )
    for picture, result in zip(pictures, body["results"], strict=True):
        image = to_uint8(picture.image)
        for explanation in result["explanations"]:
            f = explanation["faithfulness"]
            assert len(f["deletion"]) == len(f["insertion"]) == STEPS + 1
            # Step 0 of deletion and step 20 of insertion are the image: the answer's score.
            score = explanation["target"]["score"]
            assert f["deletion"][0] == pytest.approx(score, abs=1e-5)
            assert f["insertion"][-1] == pytest.approx(score, abs=1e-5)
            assert f["deletion"][-1] == pytest.approx(f["insertion"][0], abs=1e-6)
            assert f["deletion_auc"] == pytest.approx(auc(np.array(f["deletion"])), abs=1e-5)
            assert f["insertion_auc"] == pytest.approx(auc(np.array(f["insertion"])), abs=1e-5)
            deletion, insertion = _recomputed(
                runtime,
                image,
                np.array(explanation["heatmap"]["values"]),
                explanation["target"]["index"],
            )
            assert f["deletion_auc"] == pytest.approx(auc(deletion), abs=0.02)
            assert f["insertion_auc"] == pytest.approx(auc(insertion), abs=0.02)
    # Not asked for: not there.
    plain = _explain(runtime, images=[encode(phantom_png(3, 128, 128))])
    assert "faithfulness" not in plain["results"][0]["explanations"][0]


def test_the_curves_have_their_own_limit(runtime: Runtime) -> None:
    settings = Settings(device="cpu", max_faithfulness_per_request=2)
    request = ExplainRequest.model_validate(
        {
            "images": [encode(phantom_png(3, 128, 128))],
            "targets": [[0, 1, 2]],
            "include": ["faithfulness"],
        }
    )
    with pytest.raises(PayloadTooLarge) as caught:
        explain(request, runtime, settings)
    assert caught.value.code.value == "too_many_targets"
    assert caught.value.field == "include"
    assert "faithfulness" in str(caught.value)
    # The same explanations without the curves are within the plain limit.
    explain(request.model_copy(update={"include": []}), runtime, settings)


def _centred_blob(size: int) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * (size / 4) ** 2))


@pytest.mark.slow  # curves of 40 phantoms × 3 maps: seconds
def test_gradcam_is_more_faithful_than_a_random_or_centred_map(runtime: Runtime) -> None:
    """Ground truth on the demo model (the README's table runs this on 200 phantoms:
    tests/benchmarks/faithfulness.py). Each phantom's top-1 finding; phantoms without a
    finding are skipped (nothing to delete). Where the blurred substrate keeps the class's
    score (an opacity is a haze: a blur leaves it), every map's curves are flat at the
    top and tie: those are reported apart, not counted as wins or losses."""
    engine = runtime._explainers["phantom"]
    pictures = [p for p in (phantom(seed, 128, 128) for seed in range(100, 140)) if p.findings]
    images = [to_uint8(p.image)[:, :, None] for p in pictures]
    n = len(images)
    job = Job("phantom", "features", images, [None] * n, [[None]] * n, ["gradcam"] * n)
    result = runtime.run(job, deadline=float("inf"))
    inputs = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - 0.37) / 0.21
    generator = torch.Generator().manual_seed(0)
    layer = result.maps[0][0].shape
    maps = {
        "gradcam": [[torch.from_numpy(m[0])] for m in result.maps],
        "random": [[torch.rand(layer, generator=generator)] for _ in range(n)],
        "centred": [[_centred_blob(layer[0])] for _ in range(n)],
    }
    curves = {
        name: np.stack(
            [
                c[0]
                for c in engine_faithfulness.curves(
                    lambda x: torch.sigmoid(engine.logits(x)),
                    engine_faithfulness.Explanations(
                        inputs, torch.from_numpy(result.scores), cams, result.targets, [True] * n
                    ),
                )
            ]
        )
        for name, cams in maps.items()
    }
    # Informative: the substrate at least halves the class's score.
    deletion = curves["gradcam"][:, 0]
    informative = deletion[:, -1] <= deletion[:, 0] / 2
    flat = [FINDINGS[result.targets[i][0]] for i in np.flatnonzero(~informative)]
    assert set(flat) <= {"opacity"}, flat
    assert informative.sum() >= 0.75 * n
    aucs = {name: np.array([[auc(d), auc(i)] for d, i in c]) for name, c in curves.items()}
    wins = {}
    for other in ("random", "centred"):
        ours, theirs = aucs["gradcam"][informative], aucs[other][informative]
        wins[other] = (np.mean(ours[:, 0] < theirs[:, 0]), np.mean(ours[:, 1] > theirs[:, 1]))
    assert min(wins["random"]) >= 0.95, wins
    assert wins["centred"][1] >= 0.95, wins
    # Deletion against the centred blob is where the metric, not the map, falls short
    # (docs/trust.md: 69.5 % on 200 phantoms): once Grad-CAM's region is gone (score ~0
    # at 5 %), its zero-valued pixels tie and go in pixel order, from the top row down,
    # and the blurred band at the top of the chest reads as a mass to this model.
    assert wins["centred"][0] >= 0.6, wins
