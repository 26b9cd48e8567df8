"""A 3-D image on its own voxel grid, as the readers of NIfTI files and DICOM series give it.

The convention is nibabel's and MONAI's: ``voxels[i, j, k]`` is the voxel at index
``(i, j, k)`` of the file's grid, and ``affine`` maps ``(i, j, k, 1)`` to millimetres in
RAS+ (x grows towards the patient's Right, y Anterior, z Superior). DICOM's patient
coordinates are LPS+, so the DICOM readers negate x and y. For a DICOM series, ``i`` runs
along a row (the columns), ``j`` down a column (the rows), ``k`` across the slices in the
order of their position along the slice normal (MONAI's PydicomReader orders them by
InstanceNumber instead: see ``dicom_volume_checks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

VolumeSource = Literal["nifti", "dicom"]
# Called by a reader with the volume's (I, J, K) shape from its header(s), before any
# voxel is read or decoded; raises to refuse it (the error propagates as it is).
VolumeAdmit = Callable[[tuple[int, int, int]], None]


@dataclass(frozen=True)
class Volume:
    """``voxels``: ``(I, J, K) float32``, the stored values after the file's rescale (HU
    for CT); ``affine``: ``(4, 4) float64``, voxel index → RAS+ millimetres; ``source``:
    which reader made it."""

    voxels: np.ndarray
    affine: np.ndarray
    source: VolumeSource

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k = self.voxels.shape
        return int(i), int(j), int(k)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """The voxel size in mm along i, j and k (the lengths of the affine's columns)."""
        lengths = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(lengths[0]), float(lengths[1]), float(lengths[2])


def peak_index(values: np.ndarray) -> tuple[int, int, int]:
    """The first highest voxel of a map ``values`` ``(I, J, K)`` (C order)."""
    i, j, k = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(i), int(j), int(k)


def peak_at(
    values: np.ndarray, affine: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A map's first highest voxel (``peak_index``) and its centre in RAS+ mm, on the
    grid ``affine`` places: what the answer's ``peak``, the SR's 3-D point and the
    command line say of a volume's map."""
    at = peak_index(values)
    x, y, z = affine[:3, :3] @ np.asarray(at, dtype=np.float64) + affine[:3, 3]
    return at, (float(x), float(y), float(z))
