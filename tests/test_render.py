"""Geometry and rendering: heatmaps land exactly on the pixel grid they claim."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from service.imaging.geometry import fit_geometry, to_model_input
from service.imaging.render import (
    COLORMAP,
    blend,
    colorize,
    encode_png,
    heatmap,
    normalise,
    resample,
)


def test_resample_to_input_equals_torch_bilinear() -> None:
    cam = torch.rand(7, 9)
    geometry = fit_geometry(300, 200, (224, 288), "stretch")
    ours = resample(cam, geometry, "input")
    theirs = F.interpolate(cam[None, None], size=(224, 288), mode="bilinear",
                           align_corners=False)[0, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_stretch_original_equals_torch_bilinear_at_the_image_size() -> None:
    cam = torch.rand(16, 16)
    geometry = fit_geometry(517, 389, (128, 128), "stretch")
    ours = resample(cam, geometry, "original")
    theirs = F.interpolate(cam[None, None], size=(389, 517), mode="bilinear",
                           align_corners=False)[0, 0]
    assert ours.shape == (389, 517)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
def test_a_point_in_the_input_maps_back_to_the_same_place(resize: str) -> None:
    # A single hot cell of an input-resolution "layer" must come back at the
    # original pixel that the geometry maps onto it.
    width, height = 400, 250
    geometry = fit_geometry(width, height, (100, 100), resize)  # type: ignore[arg-type]
    for x, y in [(200.5, 125.5), (60.5, 200.5), (350.5, 40.5)]:
        xi = x * geometry.scale_x + geometry.offset_x
        yi = y * geometry.scale_y + geometry.offset_y
        if not (0 <= xi < 100 and 0 <= yi < 100):
            continue  # cropped away
        cam = torch.zeros(100, 100)
        cam[int(yi), int(xi)] = 1
        heat = heatmap(cam, geometry, "original")
        py, px = np.unravel_index(heat.argmax(), heat.shape)
        assert abs(px + 0.5 - x) <= 1 / geometry.scale_x + 0.5
        assert abs(py + 0.5 - y) <= 1 / geometry.scale_y + 0.5


def test_crop_leaves_unseen_pixels_at_zero_and_box_is_the_seen_part() -> None:
    geometry = fit_geometry(400, 200, (100, 100), "crop")
    x0, y0, x1, y1 = geometry.box
    assert (x0, y0, x1, y1) == pytest.approx((100, 0, 300, 200))
    heat = heatmap(torch.ones(4, 4) + torch.rand(4, 4), geometry, "original")
    assert heat[:, :99].max() == 0 and heat[:, 301:].max() == 0
    assert heat[:, 101:299].min() >= 0 and heat.max() == pytest.approx(1.0)


def test_letterbox_pads_with_the_mean_and_keeps_aspect() -> None:
    image = Image.fromarray(np.full((50, 200), 255, dtype=np.uint8))
    tensor, geometry = to_model_input(image, (100, 100), "letterbox", (0.5,), (0.25,))
    assert geometry.scale_x == pytest.approx(0.5) and geometry.scale_y == pytest.approx(0.5)
    # 25 rows of image in 100: 37 rows of padding above (integer offset), 38 below.
    assert geometry.box == pytest.approx((0, -74, 200, 126))
    assert tensor.shape == (1, 100, 100)
    assert float(tensor[0, 0, 0]) == 0.0  # padding normalises to zero
    assert float(tensor[0, 50, 50]) == pytest.approx(2.0)  # (1 - 0.5) / 0.25


def test_normalise_edge_cases() -> None:
    assert torch.equal(normalise(torch.zeros(3, 3)), torch.zeros(3, 3))
    assert torch.equal(normalise(torch.full((3, 3), 2.0)), torch.ones(3, 3))
    values = normalise(torch.tensor([[1.0, 3.0], [2.0, 5.0]]))
    assert float(values.min()) == 0 and float(values.max()) == 1
    assert not torch.isnan(normalise(torch.zeros(2, 2))).any()


def test_colour_map_and_pngs() -> None:
    assert COLORMAP.shape == (256, 3) and COLORMAP.dtype == np.uint8
    assert tuple(COLORMAP[0]) == (24, 16, 92) and tuple(COLORMAP[255]) == (205, 25, 25)
    heat = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    base = np.full((60, 80, 3), 100, dtype=np.uint8)
    blended = blend(base, heat)
    assert (blended[0, 0] == 100).all()  # value 0: the image unchanged
    for array, mode in [(colorize(heat), "RGB"), (blended, "RGB"),
                        ((heat * 255).astype(np.uint8), "L")]:
        decoded = Image.open(io.BytesIO(encode_png(array)))
        assert decoded.mode == mode and decoded.size == (80, 60)
