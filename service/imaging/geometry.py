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

from service.contract.terms import Box, ResizeMode


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
    width: int, height: int, input_size: tuple[int, int], resize: ResizeMode
) -> Geometry:
    """How an image of ``width`` × ``height`` is fitted to ``input_size`` (height, width)."""
    input_height, input_width = input_size
    if resize == "stretch":
        new_w, new_h = input_width, input_height
    else:
        pick = min if resize == "letterbox" else max
        scale = pick(input_width / width, input_height / height)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
    return Geometry(
        resize=resize,
        width=width,
        height=height,
        input_width=input_width,
        input_height=input_height,
        scale_x=new_w / width,
        scale_y=new_h / height,
        offset_x=float((input_width - new_w) // 2),
        offset_y=float((input_height - new_h) // 2),
    )


def _placement(geometry: Geometry) -> tuple[Box, Box]:
    """Where the resized image lands on the input canvas, and which part of it does:
    ``(x0, y0, x1, y1)`` on the canvas and the same region in the resized image."""
    new_w, new_h = geometry.resized_size
    ox, oy = int(geometry.offset_x), int(geometry.offset_y)
    x0, y0 = max(ox, 0), max(oy, 0)
    x1 = min(ox + new_w, geometry.input_width)
    y1 = min(oy + new_h, geometry.input_height)
    return (x0, y0, x1, y1), (x0 - ox, y0 - oy, x1 - ox, y1 - oy)


def to_model_pixels(
    image: Image.Image, input_size: tuple[int, int], resize: ResizeMode
) -> tuple[np.ndarray, Box | None, Geometry]:
    """The model input as raw pixels, where the image lies on it, and the geometry.

    Pixels: ``(H_in, W_in, c)`` with ``c`` 1 (modes ``L``, ``F``) or 3 (``RGB``);
    ``uint8`` for 8-bit images, ``float32`` in [0, 1] for mode ``F``. The box is
    ``None`` when the image covers the whole input (stretch, crop), else the
    canvas region it covers (letterbox); the engine sets the rest to 0 after
    normalising, exactly as a canvas filled with the mean would give.
    """
    geometry = fit_geometry(image.width, image.height, input_size, resize)
    (x0, y0, x1, y1), (u0, v0, u1, v1) = _placement(geometry)
    # Only the part of the image that lands on the input is resized, straight to
    # its place: a crop never resizes what it throws away (a 60000 × 1 strip is
    # not first scaled to 13 million × 224). Pillow's bilinear filter widens its
    # support when shrinking, so downscaling is antialiased, in mode F too.
    source = (
        u0 / geometry.scale_x,
        v0 / geometry.scale_y,
        u1 / geometry.scale_x,
        v1 / geometry.scale_y,
    )
    resized = np.asarray(image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=source))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    if (x0, y0, x1, y1) == (0, 0, geometry.input_width, geometry.input_height):
        return np.ascontiguousarray(resized), None, geometry
    canvas = np.zeros(
        (geometry.input_height, geometry.input_width, resized.shape[2]), dtype=resized.dtype
    )
    canvas[y0:y1, x0:x1] = resized
    return canvas, (x0, y0, x1, y1), geometry
