"""base64 text and image bytes → a Pillow image in a mode the model can use.

Output modes: ``L`` (8-bit gray), ``RGB`` (8-bit colour) or ``F`` (32-bit float gray
in [0, 1], for 16-bit and other high-bit-depth images, so no precision is lost
before the model's normalisation). The size is checked from the header (the
caller's ``admit``, see ``budgets.py``) before any pixel data is decoded, so a
decompression bomb costs milliseconds. Only the formats listed in
``PILLOW_FORMATS`` are opened, whatever else Pillow could read.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.contract.errors import ErrorCode, InvalidField, PayloadTooLarge, UnsupportedMediaType
from service.imaging.dicom import decode_dicom, is_dicom
from service.imaging.values import finite

# The formats docs/api.md promises (JPEG includes MPO, which many phone cameras write).
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")
# Called with an image's (width, height) from its header; raises to refuse it.
Admit = Callable[[int, int], None]

_DATA_URL = re.compile(r"^data:([\w/+.-]*)((?:;[\w=.-]+)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")

# Leading bytes of the formats we read: such data is an image, perhaps a damaged one.
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


# The header check (``admit``) runs before Pillow's own bomb guard could warn; the
# guard itself stays on (an image over twice its limit raises, reported as 413).
# Set once here: ``warnings.catch_warnings`` per call is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def empty_image(index: int) -> InvalidField:
    """The error for image ``index`` sent with no bytes at all (base64 or a file)."""
    return InvalidField(
        f"Image {index} is empty.",
        code=ErrorCode.EMPTY_IMAGE,
        image=index,
        field=f"images[{index}]",
    )


def decode_base64(text: str, index: int) -> bytes:
    """Raw base64 or a ``data:`` URL (standard or URL-safe alphabet, whitespace allowed)."""
    match = _DATA_URL.match(text.lstrip())
    body = text.lstrip()[match.end() :] if match else text
    body = _WHITESPACE.sub("", body)
    if not body:
        raise empty_image(index)
    body += "=" * (-len(body) % 4)
    try:
        if "-" in body or "_" in body:
            return base64.urlsafe_b64decode(body.encode("ascii"))
        return base64.b64decode(body.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidField(
            f"Image {index} is not valid base64.",
            code=ErrorCode.INVALID_BASE64,
            image=index,
            field=f"images[{index}]",
        ) from None


def _to_model_mode(image: Image.Image, channels: int, index: int) -> Image.Image:
    """Convert to ``L``/``RGB`` (8-bit) or ``F`` (high bit depth, scaled to [0, 1])."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = finite(np.asarray(image, dtype=np.float32), index)
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
    triples = [palette[i : i + 3] for i in range(0, len(palette), 3)]
    return all(r == g == b for r, g, b in triples)


def image_format(data: bytes) -> str | None:
    """The format of image bytes the service reads ("DICOM", "PNG", "JPEG", ...), from
    their header alone (nothing decoded); None if it reads no such format."""
    if is_dicom(data):
        return "DICOM"
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            return str(image.format)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def decode_image(
    data: bytes, index: int, channels: int, admit: Admit, frame: int | None = None
) -> Image.Image:
    """Decode image bytes: DICOM or one of ``PILLOW_FORMATS``; ``frame`` picks one
    frame of a multi-frame file (DICOM, TIFF, GIF, WebP; default the first).

    Returns an image in mode ``L``, ``RGB`` or ``F`` with EXIF orientation applied,
    so its pixel grid is the image as displayed.
    """
    field = f"images[{index}]"
    if not data:
        raise InvalidField(
            f"Image {index} is empty.", code=ErrorCode.EMPTY_IMAGE, image=index, field=field
        )
    if is_dicom(data):
        return decode_dicom(data, index, channels, admit, frame)
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise InvalidField(
                f"Image {index} starts like an image file but cannot be read. Is it complete?",
                code=ErrorCode.INVALID_IMAGE,
                image=index,
                field=field,
            ) from None
        raise UnsupportedMediaType(
            f"Image {index} is not in a supported image format (PNG, JPEG, TIFF, BMP, WebP, "
            "GIF, DICOM).",
            code=ErrorCode.UNSUPPORTED_IMAGE,
            image=index,
            field=field,
        ) from None
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(
            f"Image {index} is far too large: {error}",
            code=ErrorCode.IMAGE_TOO_LARGE,
            image=index,
            field=field,
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidField(
            f"Image {index} could not be read: {error}.",
            code=ErrorCode.INVALID_IMAGE,
            image=index,
            field=field,
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidField(
            f"Image {index} has no pixels ({width}×{height}).",
            code=ErrorCode.INVALID_IMAGE,
            image=index,
            field=field,
        )
    admit(width, height)
    _seek(image, index, frame)
    try:
        image.load()
        return _to_model_mode(ImageOps.exif_transpose(image), channels, index)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise InvalidField(
            f"Image {index} could not be decoded ({error}). Is the file complete?",
            code=ErrorCode.INVALID_IMAGE,
            image=index,
            field=field,
        ) from None


def _seek(image: Image.Image, index: int, frame: int | None) -> None:
    """Move to ``frame`` of a multi-frame image (the size was checked on the first;
    Pillow keeps one size for all frames of the formats we read)."""
    if not frame:
        return
    frames = getattr(image, "n_frames", 1)
    if frame >= frames:
        raise InvalidField(
            f"Image {index} has {frames} frame(s); frame {frame} does not exist.",
            code=ErrorCode.FRAME_OUT_OF_RANGE,
            image=index,
            field="frame",
        )
    try:
        image.seek(frame)
    except (OSError, ValueError, EOFError) as error:
        raise InvalidField(
            f"Image {index}: frame {frame} could not be read ({error}).",
            code=ErrorCode.INVALID_IMAGE,
            image=index,
            field="frame",
        ) from None
