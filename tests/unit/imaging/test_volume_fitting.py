"""The volume pipeline against MONAI's own transforms, on NIfTI files of every kind of
orientation: the input the model sees, its affine, and a map taken back to the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

nibabel = pytest.importorskip("nibabel")
monai_transforms = pytest.importorskip("monai.transforms")
torch = pytest.importorskip("torch")

from service.imaging.nifti import read_nifti  # noqa: E402
from service.imaging.volume_fitting import (  # noqa: E402
    VolumeFit,
    fit_volume,
    map_to_source,
    upsample_map,
)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# name: (shape, the affine's 3×3 part, origin)
GRIDS = {
    "ras": ((30, 26, 14), np.diag([0.8, 0.9, 2.5]), (-12.0, 20.0, 31.0)),
    "lps (dicom-like)": ((30, 26, 14), np.diag([-0.7, -0.7, 3.0]), (90.0, 110.0, -40.0)),
    "sagittal (axes permuted)": (
        (12, 28, 24),
        np.array([[0, 0, -2.0], [0.9, 0, 0], [0, 0.9, 0]]).T,
        (5.0, -60.0, 10.0),
    ),
    "oblique": ((28, 24, 12), _rotation(0.2) @ np.diag([0.8, 0.8, 3.0]), (1.0, 2.0, 3.0)),
}
FITS = {
    "window, area": VolumeFit((16, 20, 12), window=(-1000.0, 400.0)),
    "spacing, window, area": VolumeFit(
        (16, 16, 16), spacing=(1.5, 1.2, 2.0), window=(-1000.0, 400.0)
    ),
    "spacing, trilinear, LPS": VolumeFit(
        (20, 12, 10), orientation="LPS", spacing=(1.1, 1.7, 2.5), interpolation="trilinear"
    ),
    "nearest": VolumeFit((18, 18, 9), window=(-200.0, 200.0), interpolation="nearest"),
}


def _nifti(tmp_path: Path, grid: str) -> Path:
    shape, linear, origin = GRIDS[grid]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    rng = np.random.default_rng(7)
    voxels = rng.normal(-300, 500, shape).astype(np.int16)
    path = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(voxels, affine), path)
    return path


def _monai(fit: VolumeFit) -> Any:
    t = monai_transforms
    steps = [t.LoadImage(image_only=True), t.EnsureChannelFirst(), t.Orientation(fit.orientation)]
    if fit.spacing is not None:
        steps.append(t.Spacing(pixdim=fit.spacing))
    if fit.window is not None:
        steps.append(t.ScaleIntensityRange(*fit.window, 0.0, 1.0, clip=True))
    steps.append(t.Resize(fit.input_size, mode=fit.interpolation))
    return t.Compose(steps)


def _admit_all(shape: tuple[int, int, int]) -> None:
    pass


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("fit_name", FITS)
def test_the_input_is_monais(tmp_path: Path, grid: str, fit_name: str) -> None:
    fit = FITS[fit_name]
    path = _nifti(tmp_path, grid)
    expected = _monai(fit)(str(path))
    volume = read_nifti(path.read_bytes(), _admit_all)
    pixels, geometry = fit_volume(volume, fit)
    assert pixels.shape == fit.input_size and pixels.dtype == np.float32
    scale = 1.0 if fit.window else 1000.0  # without a window the values are HU
    np.testing.assert_allclose(pixels, expected[0].numpy(), atol=2e-5 * scale)
    # The input's affine places each voxel where MONAI's metadata says it is.
    np.testing.assert_allclose(geometry.input_affine, expected.affine.numpy(), atol=1e-4)


@pytest.mark.parametrize("grid", GRIDS)
def test_a_map_goes_back_to_the_file_grid_as_monai_inverts_it(tmp_path: Path, grid: str) -> None:
    fit = VolumeFit((16, 16, 12), spacing=(1.3, 1.1, 2.2), window=(-1000.0, 400.0))
    path = _nifti(tmp_path, grid)
    pipeline = _monai(fit)
    fitted = pipeline(str(path))
    volume = read_nifti(path.read_bytes(), _admit_all)
    _, geometry = fit_volume(volume, fit)
    # A smooth map on a coarse layer grid, at the input size as MONAI's GradCAM gives it.
    coarse = np.random.default_rng(3).random((4, 4, 3)).astype(np.float32)
    heat = upsample_map(coarse, fit.input_size)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None, None], size=fit.input_size, mode="trilinear"
    )[0, 0].numpy()
    np.testing.assert_allclose(heat, reference, atol=1e-6)
    ours = map_to_source(heat, geometry)
    assert ours.shape == volume.shape
    fitted.array = torch.from_numpy(heat)[None]  # the map in place of the input, same meta
    theirs = pipeline.inverse(fitted)[0].numpy()
    assert theirs.shape == ours.shape
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.99


@pytest.mark.parametrize("grid", GRIDS)
def test_a_map_of_world_position_comes_back_as_the_same_function(tmp_path: Path, grid: str) -> None:
    """Linear interpolation keeps a linear function exactly: a map equal to x + 2y − z (mm)
    on the input grid is x + 2y − z on the file's grid, inside the input's extent."""
    fit = VolumeFit((20, 18, 14), spacing=(1.0, 1.3, 2.0))
    volume = read_nifti(_nifti(tmp_path, grid).read_bytes(), _admit_all)
    _, geometry = fit_volume(volume, fit)

    def field(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
        world = index @ affine[:3, :3].T + affine[:3, 3]
        return (world @ np.array([1.0, 2.0, -1.0])).astype(np.float32)

    heat = field(geometry.input_affine, fit.input_size)
    back = map_to_source(heat, geometry)
    expected = field(volume.affine, volume.shape)
    # Inside: source voxels whose input coordinate lies within the input's first and last
    # voxel centres (outside them the map is held at the edge, as a border pad does).
    index = np.stack(np.meshgrid(*map(np.arange, volume.shape), indexing="ij"), axis=-1)
    world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    inverse = np.linalg.inv(geometry.input_affine)
    at = world @ inverse[:3, :3].T + inverse[:3, 3]
    inside = np.all((at >= 0) & (at <= np.array(fit.input_size) - 1), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(back[inside], expected[inside], atol=1e-2)
