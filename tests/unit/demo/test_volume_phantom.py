"""The CT phantom volumes: seeded, in HU, on a RAS+ grid, with nodules where they say."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.demo.volume_phantom import (
    AIR_HU,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    NODULE_HU,
    NODULE_RADIUS_MM,
    Nodule,
    VolumePhantom,
    iter_volume_phantoms,
    sample_volume_phantom,
)
from tools.demo_model.train_volume import (
    ACCURACY_SEED,
    INPUT_SIZE,
    POINTING_SEED,
    TRAIN_SEED,
    WEIGHTS_PATH,
    accuracy,
    load_model,
    preprocess,
)

SEED = 31_337


@pytest.fixture(scope="module")
def phantoms() -> list[VolumePhantom]:
    # Every second one shows nodules: enough of each kind in a few seconds.
    return list(iter_volume_phantoms(SEED, 12, nodule_probability=0.7))


def _less(axes: tuple[float, float, float], mm: float) -> tuple[float, float, float]:
    return axes[0] - mm, axes[1] - mm, axes[2] - mm


def test_the_same_seed_gives_the_same_volumes() -> None:
    first = list(iter_volume_phantoms(5, 2))
    again = list(iter_volume_phantoms(5, 2))
    other = next(iter_volume_phantoms(6, 1))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.voxels, b.voxels)
        assert a.nodules == b.nodules
    assert not np.array_equal(first[0].voxels, other.voxels)
    single = sample_volume_phantom(np.random.default_rng(5))
    np.testing.assert_array_equal(single.voxels, first[0].voxels)


def test_grid_dtype_and_hounsfield_ranges(phantoms: list[VolumePhantom]) -> None:
    for p in phantoms:
        assert p.voxels.shape == DEFAULT_SHAPE
        assert p.voxels.dtype == np.float32
        assert p.spacing == DEFAULT_SPACING
        corner = p.voxels[:4, :4, :]  # outside the body: air, with CT noise
        assert abs(float(corner.mean()) - AIR_HU) < 5
        assert p.voxels.min() > -1100 and p.voxels.max() < 600
        centre = np.round(
            np.asarray(p.lungs[0].centre_mm) / p.spacing + (np.array(p.shape) - 1) / 2
        )
        i, j, k = centre.astype(int)
        lung = p.voxels[i - 2 : i + 3, j - 2 : j + 3, k - 2 : k + 3]
        assert -920 < np.median(lung) < -780  # a nodule may sit there: the median
        # Soft tissue in front of the lungs (the chest wall, anterior: +y).
        ci = p.shape[0] // 2
        assert -20 < np.median(p.voxels[ci - 3 : ci + 3, -30:-25, :]) < 100


def test_nodules_lie_inside_the_lungs_and_the_volume(phantoms: list[VolumePhantom]) -> None:
    nodules = [(p, n) for p in phantoms for n in p.nodules]
    assert len(nodules) >= 5
    for p, n in nodules:
        assert NODULE_RADIUS_MM[0] <= n.radius_mm <= NODULE_RADIUS_MM[1]
        directions = np.random.default_rng(0).normal(size=(500, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        surface = np.asarray(n.centre_mm) + n.radius_mm * directions
        assert any(lung.contains(surface).all() for lung in p.lungs)
        low, high = n.box(p.spacing, pad=1)
        assert min(low) >= 0 and all(h < s for h, s in zip(high, p.shape, strict=True))
        assert NODULE_HU[0] <= n.hu <= NODULE_HU[1]
        # Painted in its box: denser there than the lung around it. (At worst, its
        # centre on a voxel corner, the densest voxel holds a quarter of the sphere.)
        box = tuple(slice(lo, hi + 1) for lo, hi in zip(*n.box(p.spacing), strict=True))
        around = tuple(slice(lo, hi + 1) for lo, hi in zip(low, high, strict=True))
        lung = float(np.median(p.voxels[around]))
        assert lung < -780
        assert p.voxels[box].max() > lung + 0.25 * (n.hu - lung) - 25


def test_a_phantom_without_nodules_has_no_nodule_density_in_its_lungs() -> None:
    p = next(iter_volume_phantoms(SEED, 1, nodule_probability=0.0))
    assert p.nodules == () and p.label == 0
    index = np.stack(np.meshgrid(*map(np.arange, p.shape), indexing="ij"), axis=-1)
    mm = index * np.diag(p.affine)[:3] + p.affine[:3, 3]
    # Well inside a lung (the edge blends into the chest wall), only lung.
    shrunk = [type(lung)(lung.centre_mm, _less(lung.semi_axes_mm, 12)) for lung in p.lungs]
    inside = np.logical_or.reduce([lung.contains(mm) for lung in shrunk])
    assert inside.sum() > 1000
    assert p.voxels[inside].max() < -700


def test_the_box_holds_the_sphere() -> None:
    spacing = (3.5, 3.5, 5.0)
    for centre in ((10.0, 20.3, 7.5), (10.49, 20.51, 7.0)):
        n = Nodule(centre_mm=(0, 0, 0), centre_voxel=centre, radius_mm=4.0, hu=0.0)
        low, high = n.box(spacing)
        for axis, (c, step) in enumerate(zip(centre, spacing, strict=True)):
            # The voxels the sphere's extent reaches (voxel p spans p ± 0.5), no more.
            assert low[axis] - 0.5 <= c - 4.0 / step < low[axis] + 0.5
            assert high[axis] - 0.5 < c + 4.0 / step <= high[axis] + 0.5
        grown_low, grown_high = n.box(spacing, pad=2)
        assert grown_low == tuple(v - 2 for v in low)
        assert grown_high == tuple(v + 2 for v in high)


def test_the_affine_is_ras_and_centres_the_volume(phantoms: list[VolumePhantom]) -> None:
    for p in phantoms[:3]:
        assert p.affine.dtype == np.float64
        np.testing.assert_allclose(p.affine[:3, :3], np.diag(p.spacing))
        centre = p.affine @ np.array([*((np.array(p.shape) - 1) / 2), 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
        # The right lung (drawn first) is at +x, the patient's right; the spine behind (-y).
        assert p.lungs[0].centre_mm[0] > 0 > p.lungs[1].centre_mm[0]
        x, y, _ = np.argwhere(p.voxels > 250).mean(axis=0)
        assert y < p.shape[1] / 2 - 10 and abs(x - (p.shape[0] - 1) / 2) < 4
        for n in p.nodules:
            voxel = np.linalg.solve(p.affine, np.array([*n.centre_mm, 1.0]))[:3]
            np.testing.assert_allclose(voxel, n.centre_voxel, atol=1e-9)


def test_nodules_on_a_resized_grid(phantoms: list[VolumePhantom]) -> None:
    p = next(p for p in phantoms if p.nodules)
    shape = (64, 64, 64)
    spacing = p.spacing_on_grid(shape)
    np.testing.assert_allclose(spacing, (5.25, 5.25, 5.0))
    for old, new in zip(p.nodules, p.nodules_on_grid(shape), strict=True):
        assert new.centre_mm == old.centre_mm and new.radius_mm == old.radius_mm
        # The same point, measured from the field of view's edge in mm on either grid.
        for axis in range(3):
            edge_old = (old.centre_voxel[axis] + 0.5) * p.spacing[axis]
            edge_new = (new.centre_voxel[axis] + 0.5) * spacing[axis]
            assert edge_new == pytest.approx(edge_old)


def test_count_filter_and_bad_probability() -> None:
    singles = list(iter_volume_phantoms(SEED, 3, nodule_count=1))
    assert [len(p.nodules) for p in singles] == [1, 1, 1]
    with pytest.raises(ValueError, match="probability"):
        iter_volume_phantoms(SEED, 1, nodule_probability=1.5)


# Neither the training seed nor those of the evaluation in train_volume.
MODEL_SEED = 90_377


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_the_committed_3d_model_finds_nodules_in_fresh_phantoms() -> None:
    assert MODEL_SEED not in (TRAIN_SEED, ACCURACY_SEED, POINTING_SEED)
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    model = load_model(WEIGHTS_PATH)
    x = preprocess(next(iter_volume_phantoms(MODEL_SEED, 1)).voxels)
    assert x.shape == (1, *INPUT_SIZE) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    with torch.inference_mode():
        assert model.features(x[None]).shape[2:] == (32, 32, 32)  # the Grad-CAM layer
    assert accuracy(model, iter_volume_phantoms(MODEL_SEED, 20)) >= 0.9
