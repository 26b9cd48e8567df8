"""DICOM display transforms, checked against pydicom's own reading of its test files."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from service.contract.errors import InvalidField
from service.imaging.dicom import decode_dicom, is_dicom
from tests.helpers import pydicom_file


def _any_size(width: int, height: int) -> None:
    """An ``admit`` that accepts every size (the budgets are tested on their own)."""


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_window_and_rescale_follow_the_standard() -> None:
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window in HU
    image = decode_dicom(_bytes(ds), 0, 1, _any_size, None)
    assert image.mode == "F" and image.size == (ds.Columns, ds.Rows)
    expected = np.clip((hu - (40 - 0.5)) / 399 + 0.5, 0, 1)
    assert np.allclose(np.asarray(image), expected, atol=1e-5)


def test_monochrome1_is_inverted() -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    plain = np.asarray(decode_dicom(_bytes(ds), 0, 1, _any_size, None))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = np.asarray(decode_dicom(_bytes(ds), 0, 1, _any_size, None))
    assert np.allclose(inverted, 1 - plain, atol=1e-6)


def test_full_range_without_a_window() -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    values = np.asarray(decode_dicom(_bytes(ds), 0, 1, _any_size, None))
    assert values.min() == 0 and values.max() == 1
    # 16-bit precision survives: far more than 256 distinct levels.
    assert len(np.unique(values)) > 256


def test_not_dicom_and_no_pixels() -> None:
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    ds = pydicom.dcmread(pydicom_file("rtplan.dcm"))
    data = pydicom_file("rtplan.dcm").read_bytes()
    assert is_dicom(data) and "PixelData" not in ds
    with pytest.raises(InvalidField, match="without pixel data"):
        decode_dicom(data, 0, 1, _any_size, None)
