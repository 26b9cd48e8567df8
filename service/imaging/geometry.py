"""Fit a decoded image to the model input and remember how (the geometry).

The geometry is an axis-aligned affine map from the original image's pixel
coordinates to the model input's: ``x_in = x * scale_x + offset_x`` (the same for
y), with pixel ``i`` covering ``[i, i + 1)``. Rendering inverts it to lay a
heatmap exactly over the uploaded image.

The model input leaves here as raw pixels (``to_model_pixels``): 8-bit images
stay ``uint8`` (a quarter of the bytes to send and copy to the device), high
bit-depth ones ``float32`` in [0, 1]; the engine normalises them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.contract.terms import Box, CropOffset, Interpolation, ResizeMode


@dataclass(frozen=True)
class Geometry:
    resize: ResizeMode
    width: int
    height: int
    input_width: int
    input_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    @property
    def resized_size(self) -> tuple[int, int]:
        """``(width, height)`` the image is resized to before it is padded or cropped."""
        return (round(self.width * self.scale_x), round(self.height * self.scale_y))

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The part of the original image (its pixel coordinates) the model input covers."""
        # "0.0 -" rather than unary minus: no -0.0 in the JSON.
        return (
            0.0 - self.offset_x / self.scale_x,
            0.0 - self.offset_y / self.scale_y,
            (self.input_width - self.offset_x) / self.scale_x,
            (self.input_height - self.offset_y) / self.scale_y,
        )


def fit_geometry(
    width: int,
    height: int,
    input_size: tuple[int, int],
    resize: ResizeMode,
    scale_size: tuple[int, int] | None = None,
    crop_offset: CropOffset = "round",
) -> Geometry:
    """How an image of ``width`` × ``height`` is fitted to ``input_size`` (height, width).

    ``scale_size`` (height, width), for "stretch" and "crop": the size the image is
    resized to before the input's size is cut from its centre (timm's ``crop_pct``, a
    Hugging Face processor's ``shortest_edge`` and ``crop_size``); None: ``input_size``.
    Resizing and cutting follow torchvision's ``Resize`` and ``CenterCrop`` to the
    pixel (the shorter side to the size, the longer one truncated; the cut's offset
    rounded half to even), which timm and most training code use; ``crop_offset``
    "floor" cuts as the Hugging Face processors do (the offset rounded down).
    """
    input_height, input_width = input_size
    target_height, target_width = scale_size or input_size
    if resize == "stretch":
        new_w, new_h = target_width, target_height
    elif resize == "crop":
        new_w, new_h = _covering(width, height, target_width, target_height)
    else:
        scale = min(input_width / width, input_height / height)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
    if resize == "letterbox":
        offset_x, offset_y = (input_width - new_w) // 2, (input_height - new_h) // 2
    elif crop_offset == "floor":  # Hugging Face's center_crop: (size - crop) // 2
        offset_x, offset_y = -((new_w - input_width) // 2), -((new_h - input_height) // 2)
    else:  # torchvision's CenterCrop: int(round((size - crop) / 2))
        offset_x = -round((new_w - input_width) / 2.0)
        offset_y = -round((new_h - input_height) / 2.0)
    return Geometry(
        resize=resize,
        width=width,
        height=height,
        input_width=input_width,
        input_height=input_height,
        scale_x=new_w / width,
        scale_y=new_h / height,
        offset_x=float(offset_x),
        offset_y=float(offset_y),
    )


def _covering(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """The size that covers ``target`` keeping the image's proportions: for a square
    target as torchvision's ``Resize(side)`` (the shorter side to it, the longer one
    truncated), else the larger of the two scales, rounded."""
    if target_width == target_height:
        side = target_width
        if width <= height:
            return side, max(1, int(side * height / width))
        return max(1, int(side * width / height)), side
    scale = max(target_width / width, target_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _placement(geometry: Geometry) -> tuple[Box, Box]:
    """Where the resized image lands on the input canvas, and which part of it does:
    ``(x0, y0, x1, y1)`` on the canvas and the same region in the resized image."""
    new_w, new_h = geometry.resized_size
    ox, oy = int(geometry.offset_x), int(geometry.offset_y)
    x0, y0 = max(ox, 0), max(oy, 0)
    x1 = min(ox + new_w, geometry.input_width)
    y1 = min(oy + new_h, geometry.input_height)
    return (x0, y0, x1, y1), (x0 - ox, y0 - oy, x1 - ox, y1 - oy)


# Pillow's filters by the names timm, torchvision and the models file use.
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# A crop whose whole resized image is at most this many times the input is resized
# whole and then cut, as torchvision and timm do; a larger one only in its kept part.
_WHOLE_RESIZE_AREA = 4


def _resized_part(
    image: Image.Image, geometry: Geometry, part: Box, resample: Image.Resampling
) -> np.ndarray:
    """The ``part`` ``(u0, v0, u1, v1)`` of the resized image that lands on the input.

    Usually the whole image is resized and the part cut from it, as torchvision's
    ``Resize`` and ``CenterCrop`` do, so the pixels are theirs exactly (Pillow's
    resize of a part alone, ``box=``, differs by one level on about 0.1 % of them).
    A crop that keeps a small share of an extreme image (a 60000 × 1 strip) resizes only
    that part, straight to its place, never what it throws away (13 million × 224
    pixels); Pillow's filters reach outside the part for their support either way, and
    widen it when shrinking: downscaling is antialiased.
    """
    u0, v0, u1, v1 = part
    new_w, new_h = geometry.resized_size
    if new_w * new_h <= _WHOLE_RESIZE_AREA * geometry.input_width * geometry.input_height:
        whole = image.resize((new_w, new_h), resample)
        return np.asarray(whole if part == (0, 0, new_w, new_h) else whole.crop(part))
    source = (
        u0 / geometry.scale_x,
        v0 / geometry.scale_y,
        u1 / geometry.scale_x,
        v1 / geometry.scale_y,
    )
    return np.asarray(image.resize((u1 - u0, v1 - v0), resample, box=source))


def to_model_pixels(
    image: Image.Image,
    input_size: tuple[int, int],
    resize: ResizeMode,
    scale_size: tuple[int, int] | None = None,
    interpolation: Interpolation = "bilinear",
    crop_offset: CropOffset = "round",
) -> tuple[np.ndarray, Box | None, Geometry]:
    """The model input as raw pixels, where the image lies on it, and the geometry.

    Pixels: ``(H_in, W_in, c)`` with ``c`` 1 (modes ``L``, ``F``) or 3 (``RGB``);
    ``uint8`` for 8-bit images, ``float32`` in [0, 1] for mode ``F``. The box is
    ``None`` when the image covers the whole input (stretch, crop), else the
    canvas region it covers (letterbox); the engine sets the rest to 0 after
    normalising, exactly as a canvas filled with the mean would give.
    """
    geometry = fit_geometry(image.width, image.height, input_size, resize, scale_size, crop_offset)
    (x0, y0, x1, y1), (u0, v0, u1, v1) = _placement(geometry)
    resized = _resized_part(image, geometry, (u0, v0, u1, v1), _FILTERS[interpolation])
    if resized.ndim == 2:
        resized = resized[:, :, None]
    if (x0, y0, x1, y1) == (0, 0, geometry.input_width, geometry.input_height):
        return np.ascontiguousarray(resized), None, geometry
    canvas = np.zeros(
        (geometry.input_height, geometry.input_width, resized.shape[2]), dtype=resized.dtype
    )
    canvas[y0:y1, x0:x1] = resized
    return canvas, (x0, y0, x1, y1), geometry
