"""Heatmaps: back to the image's geometry, normalised, and drawn as arrays or images.

Resampling is separable bilinear interpolation with pixel centres at ``i + 0.5``
(what ``F.interpolate(mode="bilinear", align_corners=False)`` does), with two
cells and two weights per output pixel on each axis, so that any affine geometry
(stretch, letterbox, crop) maps a layer-resolution map onto the original pixel
grid exactly, at any size, in memory that grows only with the output (a 64 MP
output needs its own 256 MB and a few MB more). Original pixels the model never
saw (outside a crop) get 0.

Colour map (``png`` and ``overlay``): 256 entries interpolated linearly between
these anchors, from cold to hot (value → RGB)::

    0.00 ( 24,  16,  92)  deep indigo
    0.18 ( 36,  90, 210)  blue
    0.36 ( 32, 180, 220)  cyan
    0.52 ( 70, 215, 120)  green
    0.68 (210, 225,  55)  yellow
    0.84 (245, 140,  30)  orange
    1.00 (205,  25,  25)  red

``overlay`` blends that colour over the image with an opacity of ``0.6 × value``,
so cold areas keep the image as it is and hot ones turn red.

Drawing works on 8-bit levels (``to_uint8``): colouring is a palette lookup and
blending Pillow's integer ``composite`` with a per-level opacity table, both in
C. A 1024² overlay takes ~13 ms instead of ~80 ms (``tests/benchmarks/render.py``);
colours are bit-exact with the float formula, blends within one level of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.contract.terms import HeatmapSize
from service.imaging.geometry import Geometry
from service.imaging.values import to_uint8

_ANCHORS = (
    (0.00, (24, 16, 92)),
    (0.18, (36, 90, 210)),
    (0.36, (32, 180, 220)),
    (0.52, (70, 215, 120)),
    (0.68, (210, 225, 55)),
    (0.84, (245, 140, 30)),
    (1.00, (205, 25, 25)),
)
OVERLAY_MAX_OPACITY = 0.6
# Opacity of the colour over the image for each level, on Pillow's 0..255 mask scale.
_OPACITY = [round(OVERLAY_MAX_OPACITY * level) for level in range(256)]


def _build_colormap() -> np.ndarray:
    positions = np.array([p for p, _ in _ANCHORS])
    colours = np.array([c for _, c in _ANCHORS], dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(x, positions, colours[:, k]) for k in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


COLORMAP: np.ndarray = _build_colormap()  # (256, 3) uint8
_PALETTE = COLORMAP.tobytes()


@dataclass(frozen=True)
class _AxisWeights:
    """Bilinear weights along one axis: output pixel ``i`` is cell ``lower[i]`` plus
    ``frac[i]`` of the step to cell ``lower[i] + 1`` (clamped at the edge), or 0 where
    ``seen[i]`` is false (outside what the model saw)."""

    lower: np.ndarray
    frac: np.ndarray
    seen: np.ndarray


def _axis_weights(
    out_n: int, layer_n: int, input_n: int, scale: float, offset: float
) -> _AxisWeights:
    """Weights from a layer axis of ``layer_n`` cells to ``out_n`` output pixels.

    Output pixel ``i`` has its centre at ``(i + 0.5) * scale + offset`` in model-input
    coordinates; the layer's cells tile the input's ``input_n`` pixels.
    """
    centre = (np.arange(out_n, dtype=np.float64) + 0.5) * scale + offset
    u = np.clip(centre * layer_n / input_n - 0.5, 0, layer_n - 1)
    lower = np.minimum(np.floor(u).astype(np.intp), layer_n - 1)
    return _AxisWeights(lower, (u - lower).astype(np.float32), (centre >= 0) & (centre <= input_n))


def _steps(values: np.ndarray, axis: int) -> np.ndarray:
    """Each cell's step to the next one along ``axis`` (0 for the last cell)."""
    return np.diff(values, axis=axis, append=np.take(values, [-1], axis=axis))


def resample(cam: np.ndarray, geometry: Geometry, size: HeatmapSize) -> np.ndarray:
    """``(h, w)`` layer map → ``(H, W) float32`` map at ``size``, not yet normalised.

    Separable, and never more than the output in memory: along x on the small map
    (to ``(h, W)``), then each run of output rows between the same two wide rows is
    one broadcast ``row + frac × step`` into the ``(H, W)`` result.
    """
    h, w = cam.shape
    cam = cam.astype(np.float32, copy=False)
    if size == "layer":
        return cam
    if size == "input":
        ry = _axis_weights(geometry.input_height, h, geometry.input_height, 1.0, 0.0)
        rx = _axis_weights(geometry.input_width, w, geometry.input_width, 1.0, 0.0)
    else:
        ry = _axis_weights(
            geometry.height, h, geometry.input_height, geometry.scale_y, geometry.offset_y
        )
        rx = _axis_weights(
            geometry.width, w, geometry.input_width, geometry.scale_x, geometry.offset_x
        )
    wide = cam[:, rx.lower] + rx.frac * _steps(cam, axis=1)[:, rx.lower]
    wide[:, ~rx.seen] = 0
    steps = _steps(wide, axis=0)
    out = np.empty((ry.lower.shape[0], wide.shape[1]), dtype=np.float32)
    runs = np.flatnonzero(np.diff(ry.lower)) + 1
    for start, stop in zip(np.r_[0, runs], np.r_[runs, len(ry.lower)], strict=True):
        cell = ry.lower[start]
        block = out[start:stop]
        np.multiply(ry.frac[start:stop, None], steps[cell], out=block)
        block += wide[cell]
    out[~ry.seen] = 0
    return out


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]. An all-zero map stays zeros; a flat positive one becomes ones
    where it is positive: the pixels outside a crop, which the model never saw, stay 0
    (a random model's map of 1e-16 over its crop once painted the whole image red)."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return (values > 0).astype(np.float32) if high > 0 else np.zeros_like(values)
    scaled = (values - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0, 1, out=scaled)


def output_shape(cam: np.ndarray, geometry: Geometry, size: HeatmapSize) -> tuple[int, int]:
    """``(H, W)`` of the map ``resample`` returns, without computing it."""
    if size == "layer":
        return (int(cam.shape[0]), int(cam.shape[1]))
    if size == "input":
        return (geometry.input_height, geometry.input_width)
    return (geometry.height, geometry.width)


def heatmap(cam: np.ndarray, geometry: Geometry, size: HeatmapSize) -> np.ndarray:
    """``(H, W) float32`` in [0, 1] at ``size`` for a raw layer map."""
    return normalise(resample(cam, geometry, size))


def colour_image(levels: np.ndarray) -> Image.Image:
    """``(H, W) uint8`` levels → an RGB image through ``COLORMAP`` (a palette lookup)."""
    height, width = levels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(levels).tobytes())
    image.putpalette(_PALETTE)
    return image.convert("RGB")


def overlay_image(base: Image.Image, levels: np.ndarray) -> Image.Image:
    """``levels`` coloured over ``base`` (RGB, same size) at opacity 0.6 × value."""
    mask = Image.fromarray(np.ascontiguousarray(levels)).point(_OPACITY)
    return Image.composite(colour_image(levels), base, mask)


def to_rgb_image(image: Image.Image) -> Image.Image:
    """A decoded image (``L``, ``RGB`` or float ``F`` in [0, 1]) as an 8-bit RGB image."""
    if image.mode == "F":
        image = Image.fromarray(to_uint8(np.asarray(image, dtype=np.float32)))
    return image if image.mode == "RGB" else image.convert("RGB")
