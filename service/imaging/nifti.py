"""NIfTI files in and out: a ``.nii`` or ``.nii.gz`` volume as a ``Volume``, a heatmap as a
``.nii.gz`` that carries its grid's affine (nibabel, the ``volumes`` extra).

Read in the order that keeps a hostile file cheap: the header alone (from the first
bytes, decompressed no further), the shape it declares checked by ``admit`` (the
request's limits and memory budget), then the data decompressed up to exactly what that
shape needs and not a byte more (a gzip bomb stops there). A file is told apart by its
content, not its name: gzip's magic, then the header's size field and NIfTI's magic.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import Any

import numpy as np

from service.contract.errors import ErrorCode, InvalidField, UnsupportedMediaType
from service.imaging.volume import Volume, VolumeAdmit

_GZIP_MAGIC = b"\x1f\x8b"
# NIfTI-1: sizeof_hdr 348 and "n+1\0" (one file) at byte 344; NIfTI-2: 540 and "n+2\0"
# at byte 4. Either byte order.
_HEADER_BYTES = 544
_MAX_DIMS = 4  # x, y, z and a time axis of one


def _head(data: bytes, length: int) -> bytes:
    """The first ``length`` bytes of the file, decompressed if it is gzip (no further)."""
    if not data.startswith(_GZIP_MAGIC):
        return data[:length]
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        return inflater.decompress(data, length)
    except zlib.error:
        return b""


def is_nifti(data: bytes) -> bool:
    """Whether ``data`` is a single-file NIfTI-1 or NIfTI-2 volume, gzipped or not."""
    head = _head(data, _HEADER_BYTES)
    if len(head) < 348:
        return False
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    return (348 in sizes and head[344:348] == b"n+1\x00") or (
        540 in sizes and head[4:8] == b"n+2\x00"
    )


def _invalid(index: int, problem: str) -> InvalidField:
    return InvalidField(
        f"Volume {index} is not a NIfTI file that can be read: {problem}.",
        code=ErrorCode.INVALID_VOLUME,
        image=index,
        field=f"images[{index}]",
    )


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise UnsupportedMediaType(
            "This server reads no NIfTI files: install gradcam-service[volumes] (nibabel).",
            code=ErrorCode.UNSUPPORTED_IMAGE,
        ) from None
    return nibabel


def _header(data: bytes, index: int) -> Any:
    nibabel = _nibabel()
    head = _head(data, _HEADER_BYTES)
    kind = nibabel.Nifti2Header if head[4:8] == b"n+2\x00" else nibabel.Nifti1Header
    try:
        return kind.from_fileobj(io.BytesIO(head))
    except Exception as error:  # nibabel raises several kinds for a broken header
        raise _invalid(index, f"its header is broken ({error})") from None


def _declared_shape(header: Any, index: int) -> tuple[int, int, int]:
    shape = tuple(int(side) for side in header.get_data_shape())
    if len(shape) < 3 or len(shape) > _MAX_DIMS or (len(shape) == _MAX_DIMS and shape[3] != 1):
        raise _invalid(index, f"it holds a {'×'.join(map(str, shape))} array, not one 3-D volume")
    if min(shape) < 1:
        raise _invalid(index, f"its header declares an empty {'×'.join(map(str, shape))} volume")
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise _invalid(index, f"its voxels are {dtype}, not real numbers")
    return shape[0], shape[1], shape[2]


def _whole_file(data: bytes, needed: int, index: int) -> bytes:
    """The file decompressed up to ``needed`` bytes (what its header declares)."""
    if not data.startswith(_GZIP_MAGIC):
        body = data
    else:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            body = inflater.decompress(data, needed)
        except zlib.error as error:
            raise _invalid(index, f"its gzip stream is broken ({error})") from None
    if len(body) < needed:
        raise _invalid(
            index, f"it is truncated: {len(body)} bytes where its header declares {needed}"
        )
    return body[:needed]


def read_nifti(data: bytes, admit: VolumeAdmit, index: int = 0) -> Volume:
    """The volume of a NIfTI file: its voxels with the header's scaling applied, in
    float32, and its affine (nibabel's best: the sform, else the qform), as MONAI's
    ``LoadImage`` reads it. ``admit`` sees the declared shape before any voxel is read."""
    nibabel = _nibabel()
    header = _header(data, index)
    shape = _declared_shape(header, index)
    admit(shape)
    offset = int(header.get_data_offset())
    needed = offset + int(np.prod(shape)) * header.get_data_dtype().itemsize
    body = _whole_file(data, needed, index)
    try:
        image = nibabel.Nifti2Image if header.sizeof_hdr == 540 else nibabel.Nifti1Image
        loaded = image.from_bytes(body)
        voxels = np.asarray(loaded.get_fdata(dtype=np.float32)).reshape(shape)
        affine = np.asarray(loaded.affine, dtype=np.float64)
    except Exception as error:  # a header nibabel accepted but cannot apply
        raise _invalid(index, f"its data cannot be read ({error})") from None
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _invalid(index, "its affine (sform or qform) does not place the voxels in space")
    if header.get_data_dtype().kind == "f" or not _scaling_is_finite(header):
        voxels = _finite(voxels, index)
    # Kept in the file's (Fortran) order: the fitting reads it along each axis, and a
    # C-ordered copy of a CT would cost a second.
    return Volume(voxels, affine, "nifti")


def _scaling_is_finite(header: Any) -> bool:
    slope, intercept = header.get_slope_inter()
    return all(value is None or np.isfinite(value) for value in (slope, intercept))


def _finite(voxels: np.ndarray, index: int) -> np.ndarray:
    """``voxels`` with NaN (a mask's outside) and infinities as the nearest finite
    value: the window clips them as it would a value beyond its range."""
    finite = np.isfinite(voxels)
    if not finite.any():
        raise _invalid(index, "it has no finite voxel")
    if finite.all():
        return voxels
    low, high = float(voxels[finite].min()), float(voxels[finite].max())
    return np.nan_to_num(voxels, nan=low, posinf=high, neginf=low)


def write_nifti(values: np.ndarray, affine: np.ndarray, description: str = "") -> bytes:
    """A ``.nii.gz`` of ``values`` ``(I, J, K)`` (float32, or uint8 levels) placed by
    ``affine`` (voxel → RAS+ mm, written as both sform and qform, code "scanner"): any
    viewer lays it over the volume it came from. ``description``: the header's
    ``descrip`` (at most 79 ASCII characters; the command line marks its files there)."""
    nibabel = _nibabel()
    dtype = np.uint8 if values.dtype == np.uint8 else np.float32
    image = nibabel.Nifti1Image(np.asarray(values, dtype=dtype), affine)
    if description:
        image.header["descrip"] = description.encode("ascii")[:79]
    image.header.set_xyzt_units("mm")
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    # Level 1: a smooth map compresses almost as well, several times faster.
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
