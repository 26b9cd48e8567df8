"""A volume fitted to a volume model's input as MONAI's standard pipeline fits it, and a
map brought back from the input's grid to the volume's own.

The pipeline, step by step as MONAI's transforms do it (a test holds the two equal)::

    Orientation(axcodes)          axes permuted and flipped to the model's orientation
    Spacing(pixdim)               linear resampling to the voxel size in mm (if given)
    ScaleIntensityRange(clip)     the window [low, high] mapped to [0, 1], clipped
    Resize(input_size, mode)      "area" (MONAI's default), "trilinear" or "nearest"

Every step is along the axes (an orientation is a permutation and flips; Spacing keeps
the axes' directions and scales them, so its resampling is separable), so each runs as
one-dimensional passes in numpy, with no torch in the HTTP workers. The same passes run
backwards for a map: from the model input's grid to the oriented volume's, then the
orientation undone, onto the voxel grid of the file, whatever its orientation.

Each grid's affine (voxel index → RAS+ mm) is kept: the input's and the explained
layer's place a map in space as exactly as the file's own (``VolumeGeometry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.imaging.volume import Volume

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class VolumeFit:
    """What a volume model asks of its input (the models file's keys)."""

    input_size: Shape3
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    interpolation: str = "area"


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the model input lies in the volume: the file's grid, the oriented and
    resampled grid the input was resized from, and the input's own affine."""

    source_shape: Shape3
    source_affine: np.ndarray
    undo_ornt: np.ndarray  # nibabel's orientation transform, model orientation → file
    oriented_shape: Shape3
    oriented_affine: np.ndarray
    resampled_shape: Shape3
    resampled_affine: np.ndarray
    input_size: Shape3
    input_affine: np.ndarray

    @property
    def input_spacing(self) -> tuple[float, float, float]:
        """The input's voxel size in mm, along its three axes."""
        lengths = np.linalg.norm(self.input_affine[:3, :3], axis=0)
        return float(lengths[0]), float(lengths[1]), float(lengths[2])

    def grid_affine(self, shape: Shape3) -> np.ndarray:
        """The affine of a map of ``shape`` covering the input (the layer's grid): cell
        centres where an upsampling with align_corners=False puts them."""
        return self.input_affine @ _half_pixel_scaling(shape, self.input_size)


def _nibabel_orientations():  # type: ignore[no-untyped-def]
    from nibabel import orientations

    return orientations


def _half_pixel_scaling(small: Shape3, large: Shape3) -> np.ndarray:
    """The affine taking index ``c`` of a grid of ``small`` cells to the coordinate
    ``(c + 0.5)·large/small − 0.5`` of a grid of ``large`` over the same extent."""
    scale = np.array(large, dtype=np.float64) / np.array(small, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(scale)
    affine[:3, 3] = 0.5 * scale - 0.5
    return affine


def _linear_along(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """``array`` sampled at fractional ``positions`` along ``axis`` by linear
    interpolation, positions clamped to the edge (MONAI's padding "border")."""
    size = array.shape[axis]
    positions = np.clip(positions, 0, size - 1)
    low = np.floor(positions).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = (positions - low).astype(np.float32).reshape(shape)
    below = np.take(array, low, axis=axis)
    above = np.take(array, high, axis=axis)
    return below + (above - below) * weight


def _area_along(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``array`` resized to ``size`` along ``axis`` as adaptive average pooling does
    (torch's "area"): cell ``o`` is the mean of ``[⌊o·n/m⌋, ⌈(o+1)·n/m⌉)``."""
    n = array.shape[axis]
    cells = np.arange(size)
    starts = (cells * n) // size
    ends = -((-(cells + 1) * n) // size)
    zero = np.zeros_like(np.take(array, [0], axis=axis), dtype=np.float64)
    sums = np.cumsum(np.concatenate([zero, array], axis=axis, dtype=np.float64), axis=axis)
    shape = [1] * array.ndim
    shape[axis] = size
    counts = (ends - starts).reshape(shape)
    means = (np.take(sums, ends, axis=axis) - np.take(sums, starts, axis=axis)) / counts
    return means.astype(np.float32)


def _resize_along(array: np.ndarray, axis: int, size: int, mode: str) -> np.ndarray:
    n = array.shape[axis]
    if n == size:
        return array
    if mode == "area":
        return _area_along(array, axis, size)
    if mode == "nearest":
        index = np.minimum(np.floor(np.arange(size) * (n / size)).astype(np.intp), n - 1)
        return np.take(array, index, axis=axis)
    # trilinear, align_corners=False: torch's source index, clamped below at 0.
    positions = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0)
    return _linear_along(array, axis, positions)


def resize_volume(array: np.ndarray, size: Shape3, mode: str) -> np.ndarray:
    """``array`` ``(D, H, W)`` resized to ``size`` as MONAI's ``Resize(mode)``."""
    for axis in range(3):
        array = _resize_along(array, axis, size[axis], mode)
    return np.ascontiguousarray(array, dtype=np.float32)


def _orient(volume: Volume, orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxels, affine, the transform back) with the axes in ``orientation``, as MONAI's
    Orientation (nibabel's nearest axes: an oblique volume keeps its affine's tilt)."""
    orientations = _nibabel_orientations()
    source = orientations.io_orientation(volume.affine)
    target = orientations.axcodes2ornt(tuple(orientation))
    ornt = orientations.ornt_transform(source, target)
    voxels = orientations.apply_orientation(volume.voxels, ornt)
    affine = volume.affine @ orientations.inv_ornt_aff(ornt, volume.shape)
    return voxels, affine, orientations.ornt_transform(target, source)


def _resample(
    voxels: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, affine) at ``spacing`` mm, as MONAI's ``Spacing`` (diagonal=False: the
    axes keep their directions; voxel 0 stays where it was; linear, border padding)."""
    if spacing is None:
        return voxels, affine
    old = np.linalg.norm(affine[:3, :3], axis=0)
    new = np.asarray(spacing, dtype=np.float64)
    # The passes run in the order the voxels lie in memory (a NIfTI file's are in Fortran
    # order): reading a CT across its strides took four times as long.
    order = [int(a) for a in np.argsort([-abs(stride) for stride in voxels.strides], kind="stable")]
    view = voxels.transpose(order)
    for at, axis in enumerate(order):
        n = view.shape[at]
        size = int(np.round((n - 1) * old[axis] / new[axis] + 1))
        view = _linear_along(view, at, np.arange(size) * (new[axis] / old[axis]))
    voxels = view.transpose(np.argsort(order))
    resampled = affine.copy()
    resampled[:3, :3] = affine[:3, :3] / old * new
    return voxels, resampled


def fit_volume(volume: Volume, fit: VolumeFit) -> tuple[np.ndarray, VolumeGeometry]:
    """The model input ``(D, H, W) float32`` of ``volume``, and where it lies."""
    voxels, oriented_affine, undo_ornt = _orient(volume, fit.orientation)
    oriented_shape: Shape3 = (voxels.shape[0], voxels.shape[1], voxels.shape[2])
    voxels, resampled_affine = _resample(
        np.asarray(voxels, dtype=np.float32), oriented_affine, fit.spacing
    )
    resampled_shape: Shape3 = (voxels.shape[0], voxels.shape[1], voxels.shape[2])
    if fit.window is not None:
        voxels = apply_window(voxels, *fit.window)
    pixels = resize_volume(voxels, fit.input_size, fit.interpolation)
    geometry = VolumeGeometry(
        source_shape=volume.shape,
        source_affine=volume.affine,
        undo_ornt=undo_ornt,
        oriented_shape=oriented_shape,
        oriented_affine=oriented_affine,
        resampled_shape=resampled_shape,
        resampled_affine=resampled_affine,
        input_size=fit.input_size,
        input_affine=resampled_affine @ _half_pixel_scaling(fit.input_size, resampled_shape),
    )
    return pixels, geometry


def apply_window(voxels: np.ndarray, low: float, high: float) -> np.ndarray:
    """``[low, high]`` mapped to [0, 1] and clipped, as MONAI's ``ScaleIntensityRange(low,
    high, 0, 1, clip=True)``; ``(I, J, K) float32``."""
    scaled = (voxels - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0, 1, out=scaled).astype(np.float32, copy=False)


def upsample_map(cam: np.ndarray, size: Shape3) -> np.ndarray:
    """A layer-grid map at ``size`` (the input's): trilinear, align_corners=False, as
    MONAI's and pytorch-grad-cam's 3-D Grad-CAM upsample it."""
    return resize_volume(cam, size, "trilinear")


def map_to_source(heat: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """A map on the input's grid, on the file's own voxel grid: linear along each axis
    back through the resize and the spacing, then the orientation undone."""
    oriented = np.linalg.norm(geometry.oriented_affine[:3, :3], axis=0)
    resampled = np.linalg.norm(geometry.resampled_affine[:3, :3], axis=0)
    for axis in range(3):
        n, m = geometry.resampled_shape[axis], geometry.input_size[axis]
        # oriented index → resampled coordinate → input coordinate (half-pixel resize)
        at = np.arange(geometry.oriented_shape[axis]) * (oriented[axis] / resampled[axis])
        heat = _linear_along(heat, axis, (at + 0.5) * (m / n) - 0.5)
    undone = _nibabel_orientations().apply_orientation(heat, geometry.undo_ornt)
    return np.ascontiguousarray(undone, dtype=np.float32)
