"""CT series written with pydicom, realistic enough for dciodvfy, Orthanc and the readers:
one CT Image Storage file per slice, every slice of one study, series and frame of reference.

The geometry is given as DICOM states it (LPS+ millimetres): ``origin`` is the
ImagePositionPatient of slice 0, ``orientation`` its row and column direction cosines, and
slice ``k`` lies at ``origin + k × spacing[2] × (row × column)``. ``volume_hu[i, j, k]`` is
the pixel at column ``i``, row ``j`` of slice ``k`` (the readers' convention).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
# The stored values are HU + 1024 (RescaleIntercept -1024), as most scanners write them.
INTERCEPT = -1024.0


def oblique(degrees: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Axial cosines turned by ``degrees`` about the z axis, then tilted by half as much
    about the x axis: no axis of the grid is along an axis of the patient."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    turn = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = tilt @ turn
    row, column = rotation[:, 0], rotation[:, 1]
    return (
        (float(row[0]), float(row[1]), float(row[2])),
        (float(column[0]), float(column[1]), float(column[2])),
    )


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DS's limit), precise to about 1e-10."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text[:16] if len(text) > 16 else text


def _base(series: Mapping[str, str], shape: tuple[int, int], spacing: Sequence[float]) -> Dataset:
    """The attributes every slice shares: patient, study, series, frame of reference,
    equipment and the pixel description."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate, ds.StudyTime = "20260105", "101500"
    ds.SeriesDate, ds.SeriesTime = "20260105", "101700"
    ds.ContentDate, ds.ContentTime = "20260105", "101730"
    ds.AccessionNumber = "ACC0037"
    ds.Modality = "CT"
    ds.Manufacturer = "gradcam-service tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "Synthetic chest 2.5 mm"
    ds.PatientName = "Volume^Test"
    ds.PatientID = "GRADCAM-37"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spacing[2])
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = series["study"]
    ds.SeriesInstanceUID = series["series"]
    ds.FrameOfReferenceUID = series["frame"]
    ds.StudyID = "37"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(INTERCEPT), "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    return ds


def _file_bytes(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_ct_series(
    volume_hu: np.ndarray,
    spacing: Sequence[float] = (0.7, 0.7, 2.5),
    origin: Sequence[float] = (-5.6, -4.2, -30.0),
    orientation: Sequence[Sequence[float]] = AXIAL,
    *,
    signed: bool = False,
    instance_numbers_descend: bool = False,
) -> list[bytes]:
    """``volume_hu`` ``(I, J, K)`` → the K files of a CT series, in slice order.

    ``spacing``: mm between columns, between rows, between slices. ``signed``: store
    ``int16`` (PixelRepresentation 1) rather than ``uint16``. ``instance_numbers_descend``:
    number the slices from the last one, as scanners that start at the head often do."""
    hu = np.asarray(volume_hu, dtype=np.float64)
    columns, rows, slices = hu.shape
    stored = np.rint(hu - INTERCEPT).astype(np.int16 if signed else np.uint16)
    row, column = np.asarray(orientation[0], float), np.asarray(orientation[1], float)
    normal = np.cross(row, column)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    files = []
    for k in range(slices):
        ds = _base(uids, (rows, columns), spacing)
        ds.PixelRepresentation = 1 if signed else 0
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = slices - k if instance_numbers_descend else k + 1
        position = np.asarray(origin, float) + k * float(spacing[2]) * normal
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *column)]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        files.append(_file_bytes(ds))
    return files


def edited(data: bytes, **attributes: Any) -> bytes:
    """The DICOM file ``data`` with ``attributes`` set (a value of None deletes one)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phantom_hu(shape: tuple[int, int, int] = (16, 12, 8), seed: int = 0) -> np.ndarray:
    """A small ``(I, J, K)`` volume in HU, different along every axis (so a flip or a
    transpose shows): air, a soft-tissue body, a bone-like ramp, noise."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = np.where(
        (i - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 < (shape[1] / 2) ** 2, 40, -1000
    )
    ramp = 30 * i + 7 * j + 101 * k
    return (body + ramp + rng.integers(-20, 20, size=shape)).astype(np.float64)
