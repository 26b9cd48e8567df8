"""Synthetic chest CT "phantom volumes" in Hounsfield units, with nodules whose places are known.

A phantom is a downsampled chest CT on a voxel grid (by default 96×96×64 voxels of
3.5 × 3.5 × 5.0 mm): air (-1000 HU) around an elliptic body of soft tissue (about
40 HU, with a smooth texture), a spine (bone), a few low-contrast distractors in the
soft tissue (fat, vessels), two lungs (about -850 HU) and zero to three **nodules**:
dense spheres of 3-8 mm radius, -700 to +100 HU (ground glass to solid), inside the
lungs. Each phantom knows its nodules (centre in millimetres and in voxel indices,
radius) and its lungs, so a heatmap can be checked against ground truth.

The voxel axes are nibabel's and MONAI's (``service.imaging.volume``): ``voxels[i, j, k]``,
with ``affine`` mapping ``(i, j, k, 1)`` to RAS+ millimetres: i grows towards the
patient's Right (x), j Anterior (y), k Superior (z). The affine is diagonal (the
spacing) and its origin puts the volume's centre at (0, 0, 0) mm.

A scene is drawn in millimetres and rendered on its grid; everything is seeded:
``iter_volume_phantoms(seed, count)`` gives the same volumes on every machine.
numpy only: the HTTP workers may serve examples made from this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
NODULE_HU = (-700.0, 100.0)
NODULE_RADIUS_MM = (3.0, 8.0)
DEFAULT_SHAPE = (96, 96, 64)
DEFAULT_SPACING = (3.5, 3.5, 5.0)

# How many nodules a phantom with nodules shows: 1, 2 or 3 with these odds.
_NODULE_COUNT_ODDS = (0.6, 0.25, 0.15)
# A nodule's sphere, grown by this, lies inside its lung, and two nodules are at
# least this far apart (surface to surface): each is seen against lung alone.
_NODULE_MARGIN_MM = 3.0
# Points on the unit sphere (a Fibonacci lattice) that test "the sphere is inside
# the lung"; the lungs are convex and much larger than a nodule, so 200 suffice.
_SPHERE_POINTS = 200
# Partial volume: each voxel of a nodule's box is sampled this many times per axis.
_SUPERSAMPLE = 4
# CT noise (white, HU, in the body) and the smooth textures' amplitudes (HU).
_NOISE_HU = 10.0
_TISSUE_TEXTURE_HU = 12.0
_LUNG_TEXTURE_HU = 15.0


@dataclass(frozen=True)
class Nodule:
    """A nodule: a sphere of ``radius_mm`` centred at ``centre_mm`` (RAS+) and at
    ``centre_voxel`` (continuous voxel indices ``(i, j, k)``; voxel ``(i, j, k)``'s
    centre is at those integers), of density ``hu``."""

    centre_mm: tuple[float, float, float]
    centre_voxel: tuple[float, float, float]
    radius_mm: float
    hu: float

    def box(
        self, spacing: tuple[float, float, float], pad: int = 0
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(low, high)``: inclusive voxel indices of the box of voxels the sphere
        reaches into, on a grid of ``spacing`` mm, grown by ``pad`` voxels each side
        (not clipped to the volume: the nodules lie well inside it)."""
        low, high = [], []
        for centre, step in zip(self.centre_voxel, spacing, strict=True):
            reach = self.radius_mm / step
            low.append(int(np.ceil(centre - reach - 0.5)) - pad)
            high.append(int(np.floor(centre + reach + 0.5)) + pad)
        return (low[0], low[1], low[2]), (high[0], high[1], high[2])


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in RAS+ millimetres (a lung)."""

    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]

    def contains(self, points_mm: np.ndarray) -> np.ndarray:
        """``(N, 3)`` points in mm → ``(N,) bool``: inside (or on) the ellipsoid."""
        scaled = (points_mm - np.asarray(self.centre_mm)) / np.asarray(self.semi_axes_mm)
        return np.asarray((scaled**2).sum(axis=-1) <= 1.0)


@dataclass(frozen=True)
class VolumePhantom:
    """A rendered phantom: ``voxels`` ``(I, J, K) float32`` in HU; ``spacing`` in mm
    along i, j, k; ``affine`` ``(4, 4) float64``, voxel index → RAS+ mm (diagonal,
    the volume centred on the origin); ``nodules`` and ``lungs`` in that frame."""

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    nodules: tuple[Nodule, ...]
    lungs: tuple[Ellipsoid, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k = self.voxels.shape
        return int(i), int(j), int(k)

    @property
    def label(self) -> int:
        """1 when the phantom shows a nodule, else 0 (``VOLUME_LABELS[label]``)."""
        return int(bool(self.nodules))

    def nodules_on_grid(self, shape: tuple[int, int, int]) -> tuple[Nodule, ...]:
        """The nodules in voxel indices of the same field of view resampled to
        ``shape``, the outer edges of the two grids aligned (as MONAI's ``Resize``
        and ``F.interpolate`` with ``align_corners=False`` resample)."""
        scale = [new / old for new, old in zip(shape, self.shape, strict=True)]
        return tuple(
            Nodule(
                centre_mm=n.centre_mm,
                centre_voxel=_triple(
                    (c + 0.5) * s - 0.5 for c, s in zip(n.centre_voxel, scale, strict=True)
                ),
                radius_mm=n.radius_mm,
                hu=n.hu,
            )
            for n in self.nodules
        )

    def spacing_on_grid(self, shape: tuple[int, int, int]) -> tuple[float, float, float]:
        """The voxel size in mm of the same field of view resampled to ``shape``."""
        return _triple(
            step * old / new for step, old, new in zip(self.spacing, self.shape, shape, strict=True)
        )


VOLUME_LABELS: tuple[str, ...] = ("no_nodule", "nodule")


def _triple(values: Iterable[float] | np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def centred_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """``(4, 4) float64``: the diagonal RAS+ affine of ``spacing`` whose grid centre is
    at (0, 0, 0) mm."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return affine


@dataclass(frozen=True)
class _Blob:
    """A distractor in the soft tissue: an ellipsoid of ``hu``."""

    shape: Ellipsoid
    hu: float


@dataclass(frozen=True)
class _Scene:
    """Resolution-free description of a phantom (lengths in mm, RAS+, origin at centre)."""

    body: tuple[float, float, float, float]  # (cx, cy, semi-axis x, semi-axis y)
    spine: tuple[float, float, float, float]  # (cx, cy, radius, HU)
    blobs: tuple[_Blob, ...]
    lungs: tuple[Ellipsoid, ...]
    lung_hu: tuple[float, ...]
    nodules: tuple[tuple[tuple[float, float, float], float, float], ...]  # (centre, radius, HU)
    texture_seed: int
    noise_seed: int


def _sample_body(rng: np.random.Generator) -> tuple[float, float, float, float]:
    return (
        rng.uniform(-5, 5),
        rng.uniform(-5, 5),
        rng.uniform(135, 155),
        rng.uniform(95, 112),
    )


def _sample_lungs(
    rng: np.random.Generator, body: tuple[float, float, float, float]
) -> tuple[Ellipsoid, ...]:
    # Sized so that each lung keeps >= 10 mm of chest wall and the two >= 28 mm of
    # mediastinum between them, whatever the draw.
    cx, cy, _, _ = body
    lungs = []
    for side in (1.0, -1.0):  # the patient's right lung (+x), then the left
        lungs.append(
            Ellipsoid(
                centre_mm=(
                    cx + side * rng.uniform(62, 72),
                    cy + rng.uniform(-5, 8),
                    rng.uniform(-10, 10),
                ),
                semi_axes_mm=(rng.uniform(40, 48), rng.uniform(62, 75), rng.uniform(105, 130)),
            )
        )
    return tuple(lungs)


def _sample_blobs(
    rng: np.random.Generator, body: tuple[float, float, float, float], extent_z: float
) -> tuple[_Blob, ...]:
    cx, cy, ax, ay = body
    blobs = []
    for _ in range(int(rng.integers(3, 7))):
        angle, depth = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.8))
        centre = (
            cx + ax * depth * np.cos(angle),
            cy + ay * depth * np.sin(angle),
            rng.uniform(-extent_z, extent_z),
        )
        if rng.random() < 0.5:  # fat: a round pad
            axes, hu = tuple(rng.uniform(8, 18, size=3)), rng.uniform(-120, -80)
        else:  # a vessel: thin, running along z
            axes = (*rng.uniform(3, 6, size=2), rng.uniform(20, 45))
            hu = rng.uniform(55, 90)
        blobs.append(_Blob(Ellipsoid(_triple(centre), _triple(axes)), float(hu)))
    return tuple(blobs)


def _fibonacci_sphere(count: int) -> np.ndarray:
    """``(count, 3)`` points spread evenly on the unit sphere."""
    index = np.arange(count) + 0.5
    polar = np.arccos(1 - 2 * index / count)
    azimuth = np.pi * (1 + 5**0.5) * index
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1
    )


_UNIT_SPHERE = _fibonacci_sphere(_SPHERE_POINTS)


def _place_nodule(
    rng: np.random.Generator,
    lungs: tuple[Ellipsoid, ...],
    radius: float,
    taken: list[tuple[tuple[float, float, float], float, float]],
) -> tuple[float, float, float]:
    """A centre whose sphere (grown by the margin) lies in a lung, clear of ``taken``."""
    reach = radius + _NODULE_MARGIN_MM
    while True:
        lung = lungs[int(rng.integers(len(lungs)))]
        offset = rng.uniform(-1, 1, size=3) * np.asarray(lung.semi_axes_mm)
        centre = np.asarray(lung.centre_mm) + offset
        if not lung.contains(centre + reach * _UNIT_SPHERE).all():
            continue
        if all(np.linalg.norm(centre - c) > radius + r + _NODULE_MARGIN_MM for c, r, _ in taken):
            return _triple(centre)


def _sample_nodules(
    rng: np.random.Generator, lungs: tuple[Ellipsoid, ...], probability: float
) -> tuple[tuple[tuple[float, float, float], float, float], ...]:
    if rng.random() >= probability:
        return ()
    count = 1 + int(rng.choice(len(_NODULE_COUNT_ODDS), p=_NODULE_COUNT_ODDS))
    nodules: list[tuple[tuple[float, float, float], float, float]] = []
    for _ in range(count):
        radius = float(rng.uniform(*NODULE_RADIUS_MM))
        hu = float(rng.uniform(*NODULE_HU))
        nodules.append((_place_nodule(rng, lungs, radius, nodules), radius, hu))
    return tuple(nodules)


def _sample_scene(rng: np.random.Generator, extent_z: float, nodule_probability: float) -> _Scene:
    body = _sample_body(rng)
    lungs = _sample_lungs(rng, body)
    cx, cy, _, ay = body
    return _Scene(
        body=body,
        spine=(cx, cy - ay + 28, rng.uniform(11, 14), rng.uniform(300, 450)),
        blobs=_sample_blobs(rng, body, extent_z),
        lungs=lungs,
        lung_hu=tuple(LUNG_HU + rng.uniform(-20, 20, size=len(lungs))),
        nodules=_sample_nodules(rng, lungs, nodule_probability),
        texture_seed=int(rng.integers(2**31)),
        noise_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class _Grid:
    """Voxel centres in mm along each axis, shaped to broadcast: ``x`` ``(I, 1, 1)``,
    ``y`` ``(1, J, 1)``, ``z`` ``(1, 1, K)``."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Grid:
        affine = centred_affine(shape, spacing)
        axes = [affine[a, 3] + affine[a, a] * np.arange(shape[a]) for a in range(3)]
        return cls(
            shape=shape,
            spacing=spacing,
            affine=affine,
            x=axes[0][:, None, None],
            y=axes[1][None, :, None],
            z=axes[2][None, None, :],
        )

    def to_voxel(self, point_mm: tuple[float, float, float]) -> tuple[float, float, float]:
        return _triple((np.asarray(point_mm) - self.affine[:3, 3]) / np.asarray(self.spacing))


def _cover(signed_distance_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Share of a voxel inside a shape, from the signed distance of its centre to the
    shape's surface (negative inside): a linear ramp ``edge_mm`` wide (partial volume)."""
    return np.clip(0.5 - signed_distance_mm / edge_mm, 0.0, 1.0)


def _ellipsoid_distance(shape: Ellipsoid, grid: _Grid) -> np.ndarray:
    """Approximate signed distance in mm to the ellipsoid's surface (exact on a sphere)."""
    (cx, cy, cz), (ax, ay, az) = shape.centre_mm, shape.semi_axes_mm
    rho = np.sqrt(((grid.x - cx) / ax) ** 2 + ((grid.y - cy) / ay) ** 2 + ((grid.z - cz) / az) ** 2)
    return np.asarray((rho - 1.0) * min(ax, ay, az))


def _smooth_field(seed: int, shape: tuple[int, int, int], cells: int = 5) -> np.ndarray:
    """Low-frequency texture ``(I, J, K)``: a coarse random grid, linearly upsampled."""
    field = np.random.default_rng(seed).normal(0, 1, size=(cells + 1,) * 3)
    for axis, size in enumerate(shape):
        position = (np.arange(size) + 0.5) / size * cells
        low = np.minimum(position.astype(int), cells - 1)
        weights = np.zeros((size, cells + 1))
        weights[np.arange(size), low] = 1 - (position - low)
        weights[np.arange(size), low + 1] = position - low
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return field


def _body_cover(scene: _Scene, grid: _Grid) -> np.ndarray:
    """``(I, J, K)``: the share of each voxel inside the body (an elliptic cylinder)."""
    cx, cy, ax, ay = scene.body
    rho = np.sqrt(((grid.x - cx) / ax) ** 2 + ((grid.y - cy) / ay) ** 2)
    return _cover((rho - 1.0) * min(ax, ay), grid.spacing[0]) * np.ones(grid.shape)


def _body(scene: _Scene, grid: _Grid, body: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Air, the body (soft tissue with its texture), the distractors and the spine."""
    volume = AIR_HU + body * (SOFT_TISSUE_HU - AIR_HU + _TISSUE_TEXTURE_HU * texture)
    for blob in scene.blobs:
        cover = _cover(_ellipsoid_distance(blob.shape, grid), grid.spacing[0]) * body
        volume = volume + cover * (blob.hu - SOFT_TISSUE_HU)
    sx, sy, radius, hu = scene.spine
    spine = _cover(np.hypot(grid.x - sx, grid.y - sy) - radius, grid.spacing[0])
    return volume + spine * (hu - volume)


def _lungs(volume: np.ndarray, scene: _Scene, grid: _Grid, texture: np.ndarray) -> np.ndarray:
    for lung, hu in zip(scene.lungs, scene.lung_hu, strict=True):
        cover = _cover(_ellipsoid_distance(lung, grid), grid.spacing[0])
        volume = volume + cover * (hu + _LUNG_TEXTURE_HU * texture - volume)
    return volume


def _nodule(volume: np.ndarray, grid: _Grid, nodule: Nodule) -> None:
    """Paint ``nodule`` into ``volume`` (in place): each voxel of its box takes the
    nodule's HU in proportion to the share of the voxel inside the sphere."""
    boxed = nodule.box(grid.spacing)
    # On a field of view smaller than the scene's, a nodule may reach past the edge.
    low = [max(v, 0) for v in boxed[0]]
    high = [min(v, n - 1) for v, n in zip(boxed[1], grid.shape, strict=True)]
    if any(lo > hi for lo, hi in zip(low, high, strict=True)):
        return
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
    axes = []
    for a in range(3):
        index = np.arange(low[a], high[a] + 1)
        mm = grid.affine[a, 3] + grid.spacing[a] * (index[:, None] + offsets[None, :])
        axes.append((mm - nodule.centre_mm[a]) ** 2)  # (voxels, samples)
    d2 = (
        axes[0][:, None, None, :, None, None]
        + axes[1][None, :, None, None, :, None]
        + axes[2][None, None, :, None, None, :]
    )
    share = (d2 <= nodule.radius_mm**2).mean(axis=(3, 4, 5))
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(low, high, strict=True))
    volume[box] += share * (nodule.hu - volume[box])


def _render(scene: _Scene, grid: _Grid) -> VolumePhantom:
    texture = _smooth_field(scene.texture_seed, grid.shape)
    body = _body_cover(scene, grid)
    volume = _lungs(_body(scene, grid, body, texture), scene, grid, texture)
    nodules = []
    for centre, radius, hu in scene.nodules:
        nodule = Nodule(centre, grid.to_voxel(centre), radius_mm=radius, hu=hu)
        _nodule(volume, grid, nodule)
        nodules.append(nodule)
    # Noise in the body only: the air around it stays -1000 HU, as in scans whose air
    # is masked, and which keeps the example files small (noise does not compress).
    noise = np.random.default_rng(scene.noise_seed).normal(0, _NOISE_HU, size=grid.shape) * body
    return VolumePhantom(
        voxels=(volume + noise).astype(np.float32),
        spacing=grid.spacing,
        affine=grid.affine,
        nodules=tuple(nodules),
        lungs=scene.lungs,
    )


def sample_volume_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    nodule_probability: float = 0.5,
) -> VolumePhantom:
    """Draw one random scene from ``rng`` and render it on ``shape`` voxels of ``spacing`` mm.

    The scene is sized for a field of view like the default's (336 × 336 × 320 mm): a
    smaller one cuts the body off, and may cut off nodules (listed all the same)."""
    grid = _Grid.of(shape, spacing)
    extent_z = shape[2] * spacing[2] / 2
    return _render(_sample_scene(rng, extent_z, nodule_probability), grid)


def iter_volume_phantoms(
    seed: int,
    count: int | None = None,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    nodule_probability: float = 0.5,
    nodule_count: int | None = None,
) -> Iterator[VolumePhantom]:
    """Seeded phantoms: ``count`` of them, or endless when ``count`` is None.

    ``nodule_count``: only the scenes with exactly this many nodules, skipped before
    they are rendered (the ones kept are those of the full sequence)."""
    if not 0.0 <= nodule_probability <= 1.0:
        raise ValueError("nodule_probability must be a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    grid = _Grid.of(shape, spacing)
    extent_z = shape[2] * spacing[2] / 2

    def scenes() -> Iterator[VolumePhantom]:
        while True:
            scene = _sample_scene(rng, extent_z, nodule_probability)
            if nodule_count is None or len(scene.nodules) == nodule_count:
                yield _render(scene, grid)

    return islice(scenes(), count)
