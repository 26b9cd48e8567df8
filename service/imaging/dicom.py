"""DICOM images → a Pillow image, with the display transforms a viewer applies.

pydicom decodes the pixel data (with the pylibjpeg plugins: JPEG baseline,
extended and lossless, JPEG-LS, JPEG 2000, RLE), converts YBR to RGB, and we
apply, in the standard's order: the modality LUT (rescale slope/intercept), the
VOI transform (window centre/width, or a VOI LUT, else the frame's full range),
and MONOCHROME1 inversion. Gray results stay 32-bit float (mode ``F``) in
[0, 1], so 12- and 16-bit data keep their full precision until the model's
normalisation.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from service.contract.errors import ErrorCode, InvalidField, UnsupportedMediaType
from service.imaging.codestream import declared_size
from service.imaging.values import finite, to_uint8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Deflated Explicit VR Little Endian: pydicom inflates the whole dataset in one
# call, with no bound on the size it grows to (a zip bomb), so it is refused.
_DEFLATED = b"1.2.840.10008.1.2.1.99"
# The file meta group (always plain explicit VR) fits well within this.
_META_BYTES = 4096
# Raised during decoding but not about the file: let them through. Everything
# else is the file's fault, including a Rust decoder's panic (pylibjpeg-rle raises
# pyo3's PanicException, a BaseException, on some damaged RLE frames).
_NOT_THE_FILES_FAULT = (MemoryError, KeyboardInterrupt, SystemExit)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _first(value: Any) -> float:
    """Window centre/width may be multi-valued: the first pair is the default view."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


# What ``describe_dicom`` reports: who and what the image is, and how it was shown.
_DESCRIBED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyDescription",
    "SeriesDescription",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsStored",
    "RescaleSlope",
    "RescaleIntercept",
)


def _plain(value: Any) -> str | int | float | None:
    """A DICOM element value as JSON: numbers stay numbers, the rest becomes text."""
    if value is None or value == "":
        return None
    # pydicom's IS and DS are subclasses: plain int and float for the JSON encoder.
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return float(value) if np.isfinite(value) else None
    return str(value)


def read_header(data: bytes) -> Any:
    """A DICOM file's header (a pydicom ``Dataset`` without pixel data); call after
    ``decode_dicom`` accepted the same bytes."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def describe_dicom(ds: Any, frame: int | None) -> dict[str, Any]:
    """The attributes of a DICOM file (its header, ``ds``) a person checks before trusting
    a picture of it: patient and study, modality, size, and the window it was shown with
    (``window``: ``file`` for the file's first centre/width, ``voi_lut`` for its VOI LUT,
    else ``full_range`` of the frame)."""
    described: dict[str, Any] = {key: _plain(ds.get(key)) for key in _DESCRIBED if key in ds}
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None:
        described["TransferSyntax"] = syntax.name
    described["frame"] = frame or 0
    window: dict[str, Any] = {"source": "full_range"}
    if "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) >= 1:
        window = {
            "source": "file",
            "center": _first(ds.WindowCenter),
            "width": _first(ds.WindowWidth),
        }
    elif "VOILUTSequence" in ds:
        window = {"source": "voi_lut"}
    described["window"] = window
    return described


def _voi(array: np.ndarray, ds: Any) -> np.ndarray:
    """Grayscale values after the modality LUT → [0, 1] as a viewer would show them."""
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if width >= 1:
            # PS3.3 C.11.2.1.2.1, the linear VOI function, scaled to [0, 1].
            scaled = ((array - (centre - 0.5)) / max(width - 1, 1e-6)) + 0.5
            return np.clip(scaled, 0.0, 1.0).astype(np.float32)
    if "VOILUTSequence" in ds:
        array = apply_voi_lut(array, ds).astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _count(ds: Dataset, keyword: str, default: int, index: int) -> int:
    """A whole-number attribute of the header; a value that is none (pydicom keeps an
    invalid IS such as "1A" as text) is the file's fault, a 422, not a crash."""
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        # The value itself is not quoted: headers are the client's data.
        raise InvalidField(
            f"Image {index} is a DICOM file whose {keyword} is not a whole number.",
            code=ErrorCode.INVALID_IMAGE,
            image=index,
            field=f"images[{index}]",
        ) from None


@dataclass(frozen=True)
class _PixelGrid:
    """What a header says of its pixel data: the size of a frame and how many frames."""

    rows: int
    columns: int
    frames: int


def decode_dicom(
    data: bytes, index: int, channels: int, admit: Callable[[int, int], None], frame: int | None
) -> Image.Image:
    """Decode one frame of a DICOM file to mode ``F`` (gray) or ``RGB``.

    ``admit(columns, rows)`` checks the size before any pixel is decoded; a
    compressed frame must declare that same size in its own codestream header.
    """
    _refuse_deflated(data, index)
    ds = _read(data, index)
    grid = _pixel_grid(ds, index)
    admit(grid.columns, grid.rows)
    chosen = _chosen_frame(grid, frame, index)
    _check_codestream(ds, index, chosen, grid)
    array = _decode_frame(ds, index, chosen, grid)
    return _shown(array, ds, channels, index)


def _invalid(index: int, message: str) -> InvalidField:
    """The file's fault, in ``images[index]``: a 422 saying ``message``."""
    return InvalidField(
        message, code=ErrorCode.INVALID_IMAGE, image=index, field=f"images[{index}]"
    )


def _refuse_deflated(data: bytes, index: int) -> None:
    """Refuse a deflated file before pydicom inflates it (``_DEFLATED``)."""
    if _DEFLATED in data[:_META_BYTES]:
        raise UnsupportedMediaType(
            f"Image {index} is a deflated DICOM file (transfer syntax 1.2.840.10008.1.2.1.99), "
            "which is not accepted; send it uncompressed or with a JPEG, JPEG-LS, JPEG 2000 "
            "or RLE transfer syntax.",
            code=ErrorCode.UNSUPPORTED_IMAGE,
            image=index,
            field=f"images[{index}]",
        )


def _read(data: bytes, index: int) -> Dataset:
    """The whole dataset, its pixel data not yet decoded; a file pydicom cannot read, or
    one without pixel data, is refused."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except _NOT_THE_FILES_FAULT:
        raise
    except BaseException as error:  # any reader failure means a damaged file
        raise _invalid(index, f"Image {index} is not a readable DICOM file ({error}).") from None
    if "PixelData" not in ds:
        raise _invalid(index, f"Image {index} is a DICOM file without pixel data.")
    return ds


def _pixel_grid(ds: Dataset, index: int) -> _PixelGrid:
    """The header's frame size and frame count; a frame without pixels is refused."""
    rows, columns = _count(ds, "Rows", 0, index), _count(ds, "Columns", 0, index)
    frames = _count(ds, "NumberOfFrames", 1, index) or 1
    if rows < 1 or columns < 1:
        raise _invalid(index, f"Image {index} is a DICOM file with {columns}×{rows} pixels.")
    return _PixelGrid(rows, columns, frames)


def _chosen_frame(grid: _PixelGrid, frame: int | None, index: int) -> int:
    """The frame to explain: ``frame``, which a multi-frame file requires, else 0."""
    if grid.frames > 1 and frame is None:
        raise InvalidField(
            f"Image {index} is a DICOM file with {grid.frames} frames; say which one to "
            f'explain with "frame" (0..{grid.frames - 1}).',
            code=ErrorCode.FRAME_REQUIRED,
            image=index,
            field="frame",
        )
    chosen = frame or 0
    if chosen >= grid.frames:
        raise InvalidField(
            f"Image {index} has {grid.frames} frame(s); frame {chosen} does not exist.",
            code=ErrorCode.FRAME_OUT_OF_RANGE,
            image=index,
            field="frame",
        )
    return chosen


def _decode_frame(ds: Dataset, index: int, chosen: int, grid: _PixelGrid) -> np.ndarray:
    """Frame ``chosen``'s stored values, ``(rows, columns)`` or ``(rows, columns, 3)``;
    a frame that does not decode, or decodes to another size than the header's, is
    refused."""
    from pydicom.pixels import pixel_array

    try:
        array = pixel_array(ds, index=chosen if grid.frames > 1 else None)
    except _NOT_THE_FILES_FAULT:
        raise
    except BaseException as error:  # decoder plugins raise many types; Rust ones panic
        raise _invalid(
            index, f"Image {index}: the DICOM pixel data could not be decoded ({error})."
        ) from None
    if array.shape[:2] != (grid.rows, grid.columns):
        raise _invalid(
            index,
            f"Image {index}: the pixel data decodes to {array.shape[1]}×{array.shape[0]}, not "
            f"the {grid.columns}×{grid.rows} its header states.",
        )
    return array


def _shown(array: np.ndarray, ds: Dataset, channels: int, index: int) -> Image.Image:
    """Stored values as a viewer shows them: colour scaled to [0, 1] (made gray for a
    one-channel model); gray through the modality LUT, the VOI transform and, for
    MONOCHROME1, inversion, as mode ``F``."""
    from pydicom.pixels import apply_modality_lut

    if int(ds.get("SamplesPerPixel", 1)) == 3:
        bits = int(ds.get("BitsStored", 8))
        rgb = array.astype(np.float32) / float(2**bits - 1)
        image = Image.fromarray(to_uint8(rgb))
        return image.convert("L") if channels == 1 else image
    gray = finite(apply_modality_lut(array, ds).astype(np.float32), index)
    shown = _voi(gray, ds)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        shown = 1.0 - shown
    return Image.fromarray(np.ascontiguousarray(shown, dtype=np.float32))


def _check_codestream(ds: Any, index: int, chosen: int, grid: _PixelGrid) -> None:
    """Refuse a compressed frame whose codestream declares another size than the dataset."""
    from pydicom.encaps import get_frame

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated:
        return
    try:
        data = get_frame(ds.PixelData, chosen, number_of_frames=grid.frames)
    except _NOT_THE_FILES_FAULT:
        raise
    except BaseException as error:  # a broken item structure
        raise _invalid(
            index,
            f"Image {index}: frame {chosen} cannot be found in the "
            f"encapsulated pixel data ({error}).",
        ) from None
    size = declared_size(data)
    if size is not None and (size[0] != grid.columns or (size[1] not in (grid.rows, 0))):
        raise _invalid(
            index,
            f"Image {index}: the compressed frame declares {size[0]}×{size[1]} pixels but the "
            f"DICOM header {grid.columns}×{grid.rows}; refusing to decode it.",
        )
