"""Geometry and rendering: heatmaps land exactly on the pixel grid they claim."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from service.imaging import encoders
from service.imaging.encoders import encode_image, encode_png
from service.imaging.geometry import fit_geometry, to_model_pixels
from service.imaging.render import (
    COLORMAP,
    OVERLAY_MAX_OPACITY,
    colour_image,
    heatmap,
    normalise,
    overlay_image,
    resample,
)
from service.imaging.values import to_uint8


def colorize(heat: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] → ``(H, W, 3) uint8``, the service's way (``colour_image``)."""
    return np.asarray(colour_image(to_uint8(heat)))


def blend(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` over ``base`` ``(H, W, 3) uint8``, the service's way (``overlay_image``)."""
    return np.asarray(overlay_image(Image.fromarray(np.ascontiguousarray(base)), to_uint8(heat)))


def test_resample_to_input_equals_torch_bilinear() -> None:
    cam = torch.rand(7, 9)
    geometry = fit_geometry(300, 200, (224, 288), "stretch")
    ours = resample(cam.numpy(), geometry, "input")
    theirs = F.interpolate(cam[None, None], size=(224, 288), mode="bilinear", align_corners=False)[
        0, 0
    ]
    assert np.allclose(ours, theirs.numpy(), atol=1e-5)


def test_stretch_original_equals_torch_bilinear_at_the_image_size() -> None:
    cam = torch.rand(16, 16)
    geometry = fit_geometry(517, 389, (128, 128), "stretch")
    ours = resample(cam.numpy(), geometry, "original")
    theirs = F.interpolate(cam[None, None], size=(389, 517), mode="bilinear", align_corners=False)[
        0, 0
    ]
    assert ours.shape == (389, 517)
    assert np.allclose(ours, theirs.numpy(), atol=1e-5)


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
        cam = np.zeros((100, 100), dtype=np.float32)
        cam[int(yi), int(xi)] = 1
        heat = heatmap(cam, geometry, "original")
        py, px = np.unravel_index(heat.argmax(), heat.shape)
        assert abs(px + 0.5 - x) <= 1 / geometry.scale_x + 0.5
        assert abs(py + 0.5 - y) <= 1 / geometry.scale_y + 0.5


def test_crop_leaves_unseen_pixels_at_zero_and_box_is_the_seen_part() -> None:
    geometry = fit_geometry(400, 200, (100, 100), "crop")
    x0, y0, x1, y1 = geometry.box
    assert (x0, y0, x1, y1) == pytest.approx((100, 0, 300, 200))
    heat = heatmap(
        1 + np.random.default_rng(0).random((4, 4), dtype=np.float32), geometry, "original"
    )
    assert heat[:, :99].max() == 0 and heat[:, 301:].max() == 0
    assert heat[:, 101:299].min() >= 0 and heat.max() == pytest.approx(1.0)


def test_letterbox_keeps_aspect_and_says_where_the_image_lies() -> None:
    image = Image.fromarray(np.full((50, 200), 255, dtype=np.uint8))
    pixels, box, geometry = to_model_pixels(image, (100, 100), "letterbox")
    assert geometry.scale_x == pytest.approx(0.5) and geometry.scale_y == pytest.approx(0.5)
    # 25 rows of image in 100: 37 rows of padding above (integer offset), 38 below.
    assert geometry.box == pytest.approx((0, -74, 200, 126))
    assert pixels.shape == (100, 100, 1) and pixels.dtype == np.uint8
    assert box == (0, 37, 100, 62)  # the engine zeroes the normalised input outside it
    assert pixels[:37].max() == 0 and pixels[62:].max() == 0 and pixels[37:62].min() == 255


def test_model_pixels_keep_8_bit_images_8_bit_and_the_rest_float() -> None:
    gray = Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8))
    pixels, box, _ = to_model_pixels(gray, (32, 32), "stretch")
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 1) and box is None
    rgb, _, _ = to_model_pixels(gray.convert("RGB"), (32, 32), "crop")
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    fine = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    floats, _, _ = to_model_pixels(Image.fromarray(fine), (32, 32), "stretch")
    assert floats.dtype == np.float32 and floats.shape == (32, 32, 1)
    # 16-bit detail survives: far more distinct levels than 8 bits could carry.
    assert len(np.unique(floats)) > 256


def test_normalise_edge_cases() -> None:
    assert np.array_equal(normalise(np.zeros((3, 3), np.float32)), np.zeros((3, 3)))
    assert np.array_equal(normalise(np.full((3, 3), 2.0, np.float32)), np.ones((3, 3)))
    values = normalise(np.array([[1.0, 3.0], [2.0, 5.0]], np.float32))
    assert float(values.min()) == 0 and float(values.max()) == 1
    assert not np.isnan(normalise(np.zeros((2, 2), np.float32))).any()


def test_a_flat_map_stays_inside_what_the_model_saw() -> None:
    # A 517 × 389 image cut to its centre: a flat map (a random model's 1e-16 in every
    # cell) is ones over the crop and 0 beside it, not ones everywhere.
    geometry = fit_geometry(517, 389, (128, 128), "crop", (144, 144))
    drawn = heatmap(np.full((4, 4), 1.26e-16, np.float32), geometry, "original")
    columns = drawn.max(axis=0)
    assert columns[0] == 0 and columns[-1] == 0 and columns[517 // 2] == 1
    assert float(drawn.min()) == 0 and float(drawn.max()) == 1


def test_colour_map_and_pngs() -> None:
    assert COLORMAP.shape == (256, 3) and COLORMAP.dtype == np.uint8
    assert tuple(COLORMAP[0]) == (24, 16, 92) and tuple(COLORMAP[255]) == (205, 25, 25)
    heat = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    base = np.full((60, 80, 3), 100, dtype=np.uint8)
    blended = blend(base, heat)
    assert (blended[0, 0] == 100).all()  # value 0: the image unchanged
    for array, mode in [
        (colorize(heat), "RGB"),
        (blended, "RGB"),
        ((heat * 255).astype(np.uint8), "L"),
    ]:
        decoded = Image.open(io.BytesIO(encode_png(array)))
        assert decoded.mode == mode and decoded.size == (80, 60)


def _float_blend(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The reference: the blend formula in float, alpha from the unquantised value."""
    alpha = (OVERLAY_MAX_OPACITY * heat)[:, :, None]
    colour = COLORMAP[np.round(heat * 255).astype(np.uint8)].astype(np.float64)
    return np.round(base * (1 - alpha) + colour * alpha).astype(np.uint8)


def test_fast_colouring_is_bit_exact_and_blending_within_one_level() -> None:
    rng = np.random.default_rng(7)
    heat = rng.random((257, 311), dtype=np.float32)
    heat[0, :3] = [0.0, 1.0, 0.5 / 255]  # the ends and a rounding tie
    assert np.array_equal(to_uint8(heat), np.round(heat * 255).astype(np.uint8))
    assert np.array_equal(colorize(heat), COLORMAP[np.round(heat * 255).astype(np.uint8)])
    base = rng.integers(0, 256, (257, 311, 3), dtype=np.uint8)
    difference = np.abs(blend(base, heat).astype(int) - _float_blend(base, heat).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.2


@pytest.mark.parametrize("shape", [(61, 83), (61, 83, 3), (1024, 1024, 3), (1, 1, 3)])
def test_png_encoding_round_trips_bit_exactly(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(array))))
    assert np.array_equal(decoded, array)


@pytest.mark.skipif(encoders._fpng is None, reason="fpng is not installed")
def test_rgb_pngs_come_from_fpng() -> None:
    array = np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    fpng = encoders._fpng
    assert fpng is not None
    assert encode_png(array) == fpng.from_ndarray(array)


@pytest.mark.parametrize("encoding,format_name", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_encodings_stay_close(encoding: str, format_name: str) -> None:
    heat = np.add.outer(np.linspace(0, 1, 120), np.linspace(0, 1, 90)) / 2
    picture = colorize(heat.astype(np.float32))
    decoded = Image.open(io.BytesIO(encode_image(picture, encoding)))  # type: ignore[arg-type]
    assert decoded.format == format_name and decoded.size == (90, 120)
    error = np.asarray(decoded.convert("RGB")).astype(float) - picture
    assert 10 * np.log10(255**2 / np.mean(error**2)) > 30  # PSNR in dB
