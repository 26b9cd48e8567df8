"""base64 text and image bytes → a Pillow image in a mode the model can use.

Output modes: ``L`` (8-bit gray), ``RGB`` (8-bit colour) or ``F`` (32-bit float gray
in [0, 1], for 16-bit and other high-bit-depth images, so no precision is lost
before the model's normalisation). The pixel count is checked from the header,
before any pixel data is decoded, so a decompression bomb costs milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidField, PayloadTooLarge, UnsupportedMediaType
from service.imaging.dicom import decode_dicom, is_dicom

_DATA_URL = re.compile(r"^data:([\w/+.-]*)((?:;[\w=.-]+)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")

# Leading bytes of the formats we read: such data is an image, perhaps a damaged one.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
               b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


# Our own header check replaces Pillow's bomb guard (which only warns below 2× its limit).
Image.MAX_IMAGE_PIXELS = None


def decode_base64(text: str, index: int) -> bytes:
    """Raw base64 or a ``data:`` URL (standard or URL-safe alphabet, whitespace allowed)."""
    match = _DATA_URL.match(text.lstrip())
    body = text.lstrip()[match.end():] if match else text
    body = _WHITESPACE.sub("", body)
    if not body:
        raise InvalidField(f"Image {index} is empty.", code="empty_image", image=index,
                           field=f"images[{index}]")
    body += "=" * (-len(body) % 4)
    try:
        if "-" in body or "_" in body:
            return base64.urlsafe_b64decode(body.encode("ascii"))
        return base64.b64decode(body.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidField(f"Image {index} is not valid base64.", code="invalid_base64",
                           image=index, field=f"images[{index}]") from None


def _to_model_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L``/``RGB`` (8-bit) or ``F`` (high bit depth, scaled to [0, 1])."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if mode.startswith("I;16"):
            scaled = values / 65535.0
        elif mode == "I" and values.min() >= 0 and values.max() <= 65535:
            # Pillow reads 16-bit PNGs as "I" in some versions: same full range.
            scaled = values / 65535.0
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return Image.fromarray(np.ascontiguousarray(scaled, dtype=np.float32))
    if channels == 1:
        return image if mode == "L" else image.convert("L")
    if mode in ("1", "L", "LA", "P", "PA") and _is_gray(image):
        return image.convert("L")
    return image if mode == "RGB" else image.convert("RGB")


def _is_gray(image: Image.Image) -> bool:
    if image.mode in ("1", "L", "LA"):
        return True
    palette = image.getpalette() or []
    triples = [palette[i:i + 3] for i in range(0, len(palette), 3)]
    return all(r == g == b for r, g, b in triples)


def decode_image(data: bytes, index: int, channels: int, max_pixels: int,
                 frame: int | None = None) -> Image.Image:
    """Decode image bytes: DICOM (``frame`` picks one of a multi-frame file), or any
    format Pillow reads (the first frame of an animation).

    Returns an image in mode ``L``, ``RGB`` or ``F`` with EXIF orientation applied,
    so its pixel grid is the image as displayed.
    """
    field = f"images[{index}]"
    if not data:
        raise InvalidField(f"Image {index} is empty.", code="empty_image", image=index,
                           field=field)
    if is_dicom(data):
        return decode_dicom(data, index, channels, max_pixels, frame)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise InvalidField(
                f"Image {index} starts like an image file but cannot be read. Is it complete?",
                code="invalid_image", image=index, field=field) from None
        raise UnsupportedMediaType(
            f"Image {index} is not in a supported image format (PNG, JPEG, TIFF, BMP, WebP, "
            "GIF, DICOM).",
            code="unsupported_image", image=index, field=field) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidField(f"Image {index} could not be read: {error}.", code="invalid_image",
                           image=index, field=field) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidField(f"Image {index} has no pixels ({width}×{height}).",
                           code="invalid_image", image=index, field=field)
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"Image {index} has {width}×{height} = {width * height} pixels; the limit is "
            f"{max_pixels}.", code="image_too_large", image=index, field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            return _to_model_mode(ImageOps.exif_transpose(image), channels)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise InvalidField(
            f"Image {index} could not be decoded ({error}). Is the file complete?",
            code="invalid_image", image=index, field=field) from None
