"""Encoding rendered heatmaps: PNG (lossless, the default), JPEG or WebP.

Chosen by measurement (``tests/benchmarks/encoders.py``, one core, 1024²):

| RGB overlay | time | size |
|---|---|---|
| fpng | 3-5 ms | 1273 KiB |
| Pillow PNG, zlib level 1 | 55 ms | 936 KiB |
| Pillow PNG, level 6 (its default) | 266 ms | 772 KiB |
| imagecodecs PNG, level 1 | 48 ms | 934 KiB |
| JPEG, quality 90 | 3 ms | 136 KiB |
| WebP, quality 85, method 0 | 14 ms | 47 KiB |

fpng (MIT / public domain, one C++ file) writes RGB and RGBA PNGs an order of
magnitude faster than zlib for files about a third larger; every PNG it writes
round-trips bit-exactly through Pillow (tested). It is young (0.1.0), so it is
used where it is installed and can encode, with Pillow at zlib level 1 as the
fallback and for gray images (fpng has no gray mode).
"""

from __future__ import annotations

import io
import logging
from types import ModuleType

import numpy as np
from PIL import Image

from service.contract.terms import HeatmapEncoding

logger = logging.getLogger(__name__)

Encoding = HeatmapEncoding
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 90
WEBP_QUALITY = 85
WEBP_METHOD = 0  # the fastest; methods 3-6 take 4-5× longer for ~12% fewer bytes


def _load_fpng() -> ModuleType | None:
    try:
        import fpng
    except ImportError:  # no wheel for this platform: Pillow does all PNGs
        return None
    return fpng


_fpng = _load_fpng()


def _pillow_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """``(H, W)`` gray or ``(H, W, 3)`` RGB ``uint8`` → PNG bytes, lossless."""
    array = np.ascontiguousarray(array)
    if (
        _fpng is not None
        and array.dtype == np.uint8
        and array.ndim == 3
        and array.shape[2] in (3, 4)
    ):
        data: bytes = _fpng.from_ndarray(array)
        if data:  # it returns b"" for what it cannot encode
            return data
    return _pillow_png(Image.fromarray(array))


def encode_image(array: np.ndarray, encoding: Encoding) -> bytes:
    """``(H, W)`` gray or ``(H, W, 3)`` RGB ``uint8`` in ``encoding``."""
    if encoding == "png":
        return encode_png(array)
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array))
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    return buffer.getvalue()
