"""DICOM volumes → a ``Volume``: a series of single-frame files, or one enhanced
multi-frame file (Enhanced CT or MR, their legacy-converted kinds).

Every header is read and checked first (``dicom_volume_checks``: one size, orientation
and pixel spacing, no duplicate or missing slice, even spacing), then ``admit`` is called
with the volume's (I, J, K) shape, and only then is pixel data decoded: a volume too large
to hold costs no decoding. Values go through the modality LUT (rescale slope and
intercept: HU for CT) as float32. ``voxels[i, j, k]`` is the pixel at column ``i``, row
``j`` of the ``k``-th slice along the slice normal; the affine maps it to RAS+ mm.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from service.imaging.dicom import _NOT_THE_FILES_FAULT, _refuse_deflated
from service.imaging.dicom_volume_checks import (
    Plane,
    Stack,
    invalid_volume,
    numbers,
    plane,
    stack,
)
from service.imaging.volume import Volume, VolumeAdmit

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def _dataset(data: bytes, where: str, index: int, *, pixels: bool) -> Dataset:
    """One file read by pydicom (its header only unless ``pixels``); a file it cannot
    read is refused, naming ``where``."""
    import pydicom

    _refuse_deflated(data, index)
    buffer = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(buffer, stop_before_pixels=not pixels)
    except _NOT_THE_FILES_FAULT:
        raise
    except BaseException as error:  # any reader failure means a damaged file
        raise invalid_volume(
            index, f"{where.capitalize()} is not a readable DICOM file ({error})."
        ) from None
    # pydicom reads a file cut short as far as it goes; a header read that stops before
    # the pixel data has not reached the end.
    if not pixels and buffer.tell() >= len(data):
        raise invalid_volume(
            index,
            f"{where.capitalize()} ends before any pixel data: it is cut short, or it is not "
            "an image.",
        )
    return ds


def _whole(ds: Dataset, keyword: str, default: int, where: str, index: int) -> int:
    """A whole-number attribute (Rows, Columns, NumberOfFrames, ...), ``default`` when
    absent; a value that is none is refused (it is not quoted: it is the client's data)."""
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise invalid_volume(
            index, f"{where.capitalize()} has a {keyword} that is not a whole number."
        ) from None


def _size(ds: Dataset, frames: str, where: str, index: int) -> tuple[int, int]:
    """(rows, columns) of a grayscale image with pixel data; the frame count must be
    what ``frames`` says: "one" for a file of a series, "several" for a multi-frame."""
    rows, columns = _whole(ds, "Rows", 0, where, index), _whole(ds, "Columns", 0, where, index)
    count = _whole(ds, "NumberOfFrames", 1, where, index) or 1
    if rows < 1 or columns < 1:
        raise invalid_volume(index, f"{where.capitalize()} has {columns}×{rows} pixels.")
    if _whole(ds, "SamplesPerPixel", 1, where, index) != 1:
        raise invalid_volume(
            index, f"{where.capitalize()} is a colour image; a volume's slices are grayscale."
        )
    if frames == "one" and count > 1:
        raise invalid_volume(
            index,
            f"{where.capitalize()} is a multi-frame DICOM file ({count} frames) among the "
            "files of a series; send a multi-frame volume on its own, or a series of "
            "single-frame files.",
        )
    if frames == "several" and count < 2:
        raise invalid_volume(
            index,
            f"{where.capitalize()} has {count} frame; a multi-frame volume needs at least 2.",
        )
    return rows, columns


def _series_planes(headers: Sequence[Dataset], index: int) -> list[Plane]:
    """Each file's plane, once it is known to be a single-frame slice of the first
    file's series."""
    series = [str(ds.get("SeriesInstanceUID", "")).strip() for ds in headers]
    planes = []
    for number, ds in enumerate(headers):
        where = f"file {number} of images[{index}]"
        size = _size(ds, "one", where, index)
        if not series[number]:
            raise invalid_volume(index, f"{where.capitalize()} has no SeriesInstanceUID.")
        if series[number] != series[0]:
            raise invalid_volume(
                index,
                f"{where.capitalize()} belongs to another series than file 0 (their "
                "SeriesInstanceUID differ); a volume is the files of one series.",
            )
        planes.append(plane((ds, ds, ds), size, where, index))
    return planes


def _decoded(ds: Dataset, where: str, index: int) -> np.ndarray:
    """The stored values of ``ds``'s pixel data: ``(rows, columns)``, or ``(frames, rows,
    columns)`` for a multi-frame file."""
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds:
        raise invalid_volume(index, f"{where.capitalize()} has no pixel data.")
    try:
        return np.asarray(pixel_array(ds))
    except _NOT_THE_FILES_FAULT:
        raise
    except BaseException as error:  # decoder plugins raise many types; Rust ones panic
        raise invalid_volume(
            index, f"The pixel data of {where} could not be decoded ({error})."
        ) from None


def _modality(stored: np.ndarray, ds: Dataset, where: str, index: int) -> np.ndarray:
    """Stored values through the file's modality LUT (its rescale slope and intercept,
    or its LUT), as float32."""
    from pydicom.pixels import apply_modality_lut

    try:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        raise invalid_volume(
            index,
            f"{where.capitalize()} has a modality LUT (rescale slope and intercept, or a "
            "lookup table) that cannot be applied.",
        ) from None


def _checked_finite(voxels: np.ndarray, index: int) -> np.ndarray:
    """``voxels`` if all finite (a rescale that is not a number is the file's fault)."""
    if not np.isfinite(voxels).all():
        raise invalid_volume(
            index,
            f"The volume in images[{index}] has values that are not finite numbers after "
            "its rescale slope and intercept.",
        )
    return voxels


def read_dicom_series(files: Sequence[bytes], admit: VolumeAdmit, index: int = 0) -> Volume:
    """The single-frame files (DICOM Part 10 bytes, in any order) of one series as one
    volume ``(columns, rows, slices) float32`` after the modality LUT, with its RAS+
    affine; slices ordered along their normal. A 422 ``invalid_volume`` names the file
    at fault (numbered from 0 in the order sent)."""
    return read_dicom_series_sources(files, admit, index)[0]


def read_dicom_series_sources(
    files: Sequence[bytes], admit: VolumeAdmit, index: int = 0
) -> tuple[Volume, list[Dataset]]:
    """``read_dicom_series``, and the files' headers (without pixel data) in the volume's
    slice order: ``headers[k]`` is the file of ``voxels[:, :, k]``, as the DICOM objects
    derived from the volume reference them."""
    headers = [
        _dataset(data, f"file {number} of images[{index}]", index, pixels=False)
        for number, data in enumerate(files)
    ]
    planes = _series_planes(headers, index)
    placed = stack(planes, "file", index)
    rows, columns = planes[0].size
    admit((columns, rows, len(files)))
    voxels = np.empty((columns, rows, len(files)), dtype=np.float32)
    for k, number in enumerate(placed.order):
        where = f"file {number} of images[{index}]"
        ds = _dataset(files[number], where, index, pixels=True)
        stored = _decoded(ds, where, index)
        if stored.shape != (rows, columns):
            raise invalid_volume(
                index,
                f"The pixel data of {where} decodes to an array of shape {stored.shape}, "
                f"not the {columns}×{rows} pixels its header states.",
            )
        voxels[:, :, k] = _modality(stored, ds, where, index).T
    volume = Volume(_checked_finite(voxels, index), placed.affine, "dicom")
    return volume, [headers[number] for number in placed.order]


def _group(groups: Sequence[Any], sequence: str) -> Any:
    """The item of functional group ``sequence`` that applies to a frame: from its own
    groups (``groups[0]``) if there, else from the shared ones (``groups[1]``)."""
    for holder in groups:
        if holder is not None and sequence in holder and len(holder[sequence].value) > 0:
            return holder[sequence].value[0]
    return None


def _frame_groups(ds: Dataset, frames: int, where: str, index: int) -> list[tuple[Any, Any]]:
    """Each frame's (own, shared) functional groups of an enhanced multi-frame file."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    own = ds.get("PerFrameFunctionalGroupsSequence")
    if own is None or len(own) != frames:
        raise invalid_volume(
            index,
            f"{where.capitalize()} has {frames} frames but not one per-frame functional "
            "group for each, so where its frames lie is unknown.",
        )
    return [(item, shared[0] if shared else None) for item in own]


def _rescale(groups: tuple[Any, Any], ds: Dataset, where: str, index: int) -> np.ndarray:
    """A frame's (slope, intercept): its pixel value transformation, else the file's
    own, else none (1, 0)."""
    item = _group(groups, "PixelValueTransformationSequence")
    holder = item if item is not None and "RescaleSlope" in item else ds
    if "RescaleSlope" not in holder:
        return np.array([1.0, 0.0])
    slope = numbers(holder, "RescaleSlope", 1, where, index)
    intercept = numbers(holder, "RescaleIntercept", 1, where, index)
    return np.concatenate([slope, intercept])


def _multiframe_stack(header: Dataset, index: int) -> tuple[Stack, list[np.ndarray]]:
    """The frames of an enhanced multi-frame ``header`` in order along their normal, with
    its affine, and each stored frame's (slope, intercept)."""
    where = f"images[{index}]"
    size = _size(header, "several", where, index)
    frames = _whole(header, "NumberOfFrames", 1, where, index)
    groups = _frame_groups(header, frames, where, index)
    planes, rescales = [], []
    for number, frame in enumerate(groups):
        at = f"frame {number} of images[{index}]"
        sources = [
            _group(frame, name)
            for name in (
                "PlanePositionSequence",
                "PlaneOrientationSequence",
                "PixelMeasuresSequence",
            )
        ]
        planes.append(plane(sources, size, at, index))
        rescales.append(_rescale(frame, header, at, index))
    return stack(planes, "frame", index), rescales


def multiframe_order(header: Dataset, index: int = 0) -> tuple[int, ...]:
    """The stored frame numbers (from 0) of an enhanced multi-frame volume's header in the
    volume's slice order: ``order[k]`` is the frame of ``voxels[:, :, k]`` (its headers
    are checked again, without pixel data, as ``read_multiframe_volume`` checks them)."""
    return _multiframe_stack(header, index)[0].order


def read_multiframe_volume(data: bytes, admit: VolumeAdmit, index: int = 0) -> Volume:
    """An enhanced multi-frame DICOM file (each frame placed by its functional groups) as
    one volume ``(columns, rows, frames) float32`` after each frame's rescale, with its
    RAS+ affine; frames ordered along their normal. A 422 ``invalid_volume`` names the
    frame at fault (numbered from 0 as stored)."""
    return read_multiframe_volume_source(data, admit, index)[0]


def read_multiframe_volume_source(
    data: bytes, admit: VolumeAdmit, index: int = 0
) -> tuple[Volume, Dataset]:
    """``read_multiframe_volume``, and the file's header (without pixel data), as the
    DICOM objects derived from the volume reference it (``multiframe_order`` maps its
    frames to the volume's slices)."""
    where = f"images[{index}]"
    header = _dataset(data, where, index, pixels=False)
    placed, rescales = _multiframe_stack(header, index)
    frames = len(rescales)
    rows, columns = _size(header, "several", where, index)
    admit((columns, rows, frames))
    stored = _decoded(_dataset(data, where, index, pixels=True), where, index)
    if stored.shape != (frames, rows, columns):
        raise invalid_volume(
            index,
            f"The pixel data of {where} decodes to an array of shape {stored.shape}, not "
            f"the {frames} frames of {columns}×{rows} pixels its header states.",
        )
    voxels = np.empty((columns, rows, frames), dtype=np.float32)
    for k, number in enumerate(placed.order):
        slope, intercept = rescales[number]
        voxels[:, :, k] = (stored[number] * slope + intercept).T
    return Volume(_checked_finite(voxels, index), placed.affine, "dicom"), header
