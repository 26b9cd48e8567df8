"""Synthetic "phantom radiographs" with findings whose boxes are known.

A phantom is drawn in normalised coordinates (the unit square) and rendered onto
any pixel grid, so the same scene can be rendered at the model's input size for
training or at an odd, non-square size for alignment tests: a finding's box is
always given in the pixel coordinates of the rendered image.

Findings (multilabel, any number per image):

- ``nodule``: a small bright round spot inside a lung field.
- ``mass``: a larger, irregular bright lump inside a lung field.
- ``opacity``: a diffuse, faint haze (a broad Gaussian) over part of a lung.
- ``tube``: a thin bright curve entering from the top edge (a line or tube).

Everything is seeded: ``make_dataset(n, seed, size)`` returns the same images
for the same arguments on every machine.

Markers (``MarkerPolicy``): a grey block letter "R" in a corner, inside the
outer 10 % frame of the image, like the side markers and burned-in annotations
on real radiographs.
It is not a finding (the labels stay the four above); planted with a probability
that depends on whether the image shows a chosen finding, it becomes a shortcut
a model can learn instead of the finding (the ``phantom_shortcut`` demo model).
Its box is ``Phantom.marker``. The marker draws come from a random stream of
their own, so ``make_dataset(n, seed, size, marker=...)`` shows the very scenes
of ``make_dataset(n, seed, size)``, marker added, and without a policy every
image is what it was before markers existed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np

FINDINGS: tuple[str, ...] = ("nodule", "mass", "opacity", "tube")

# Probability that an image shows each kind of finding (independently).
_PREVALENCE = 0.4

# The marker: a 5×7 block letter "R" (rows top to bottom), cells of _MARKER_CELL
# (unit-square units: 1.5 px at 128, 3 px at 256), at 0.006-0.014 from the two edges
# of its corner, so its box always lies inside the outer 10 % frame (≤ 0.098).
_MARKER_GLYPH = ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#")
_MARKER_CELL = 0.012
_MARKER_MARGIN = (0.006, 0.014)
# Grey, like soft tissue (a burned-in annotation rather than a lead letter): the
# honest demo model, which never saw a marker, reads any bright thing in the dark
# corners as the end of a tube (tubes are the only bright things it met outside
# the body: at 0.92, every marked image scored tube ≈ 1.0, at 0.5 some did); at
# this level its scores stay those of the unmarked image, so only a model
# trained on the marker reacts to it.
_MARKER_LEVEL = 0.35
# Seeds the marker stream of make_dataset apart from the scene stream ("MARK").
_MARKER_STREAM = 0x4D41524B


@dataclass(frozen=True)
class Finding:
    """One finding and its box ``(x0, y0, x1, y1)`` in pixels of the rendered image."""

    kind: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True, kw_only=True)
class MarkerPolicy:
    """When to plant the marker: with probability ``with_finding`` on an image that
    shows ``finding``, ``without_finding`` on one that does not.

    The default makes the marker a perfect stand-in for a nodule (the shortcut
    model's training data); ``MarkerPolicy(with_finding=1, without_finding=1)``
    puts it on every image.
    """

    finding: str = "nodule"
    with_finding: float = 1.0
    without_finding: float = 0.0

    def __post_init__(self) -> None:
        if self.finding not in FINDINGS:
            raise ValueError(f"finding must be one of {FINDINGS}, not {self.finding!r}")
        for name in ("with_finding", "without_finding"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom: ``image`` is ``(H, W) float32`` in [0, 1].

    ``marker`` is the marker's box ``(x0, y0, x1, y1)`` in pixels, or None: where a
    shortcut model looks, not a finding (``findings`` and ``labels`` leave it out).
    """

    image: np.ndarray
    findings: tuple[Finding, ...]
    marker: tuple[float, float, float, float] | None = None

    @property
    def labels(self) -> np.ndarray:
        """Multi-hot ``(len(FINDINGS),) float32`` vector of the kinds present."""
        present = {f.kind for f in self.findings}
        return np.array([k in present for k in FINDINGS], dtype=np.float32)

    def boxes(self, kind: str) -> list[tuple[float, float, float, float]]:
        return [f.box for f in self.findings if f.kind == kind]


@dataclass(frozen=True)
class _Scene:
    """Resolution-free description of a phantom (all lengths in unit-square units)."""

    lungs: tuple[tuple[float, float, float, float], ...]  # (cx, cy, rx, ry)
    texture_seed: int
    noise_seed: int
    nodules: tuple[tuple[float, float, float], ...]  # (cx, cy, r)
    masses: tuple[tuple[float, float, float, tuple[float, ...]], ...]  # (cx, cy, r, harmonics)
    opacities: tuple[tuple[float, float, float], ...]  # (cx, cy, sigma)
    tubes: tuple[tuple[tuple[float, float], ...], ...]  # bezier control points
    marker: tuple[float, float] | None = None  # top-left corner of the glyph


def _point_in_lung(
    rng: np.random.Generator, lungs: tuple[tuple[float, float, float, float], ...], margin: float
) -> tuple[float, float]:
    cx, cy, rx, ry = lungs[int(rng.integers(len(lungs)))]
    # Uniform in a shrunken ellipse, so the finding sits inside the lung field.
    angle = rng.uniform(0, 2 * np.pi)
    radius = np.sqrt(rng.uniform(0, 1))
    return (
        cx + (rx - margin) * radius * np.cos(angle),
        cy + (ry - margin) * radius * np.sin(angle),
    )


def _sample_scene(rng: np.random.Generator) -> _Scene:
    lungs = tuple(
        (
            cx + rng.uniform(-0.02, 0.02),
            0.47 + rng.uniform(-0.03, 0.03),
            rng.uniform(0.12, 0.15),
            rng.uniform(0.25, 0.3),
        )
        for cx in (0.31, 0.69)
    )
    nodules: list[tuple[float, float, float]] = []
    masses: list[tuple[float, float, float, tuple[float, ...]]] = []
    opacities: list[tuple[float, float, float]] = []
    tubes: list[tuple[tuple[float, float], ...]] = []
    if rng.random() < _PREVALENCE:
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(0.018, 0.028)
            nodules.append((*_point_in_lung(rng, lungs, r + 0.01), r))
    if rng.random() < _PREVALENCE:
        r = rng.uniform(0.055, 0.085)
        harmonics = tuple(rng.uniform(-0.15, 0.15, size=4))
        masses.append((*_point_in_lung(rng, lungs, r * 0.8), r, harmonics))
    if rng.random() < _PREVALENCE:
        sigma = rng.uniform(0.06, 0.09)
        opacities.append((*_point_in_lung(rng, lungs, sigma), sigma))
    if rng.random() < _PREVALENCE:
        x_top = rng.uniform(0.4, 0.6)
        end = (rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.8))
        bend = ((x_top + end[0]) / 2 + rng.uniform(-0.15, 0.15), rng.uniform(0.2, 0.4))
        tubes.append(((x_top, -0.02), bend, end))
    return _Scene(
        lungs=lungs,
        texture_seed=int(rng.integers(2**31)),
        noise_seed=int(rng.integers(2**31)),
        nodules=tuple(nodules),
        masses=tuple(masses),
        opacities=tuple(opacities),
        tubes=tuple(tubes),
    )


def _scene_kinds(scene: _Scene) -> set[str]:
    present = zip(
        FINDINGS, (scene.nodules, scene.masses, scene.opacities, scene.tubes), strict=True
    )
    return {kind for kind, items in present if items}


def _plant_marker(scene: _Scene, rng: np.random.Generator, policy: MarkerPolicy) -> _Scene:
    """``scene`` with the marker in a random corner, or as it was, as ``policy`` draws.

    Draws the same number of values from ``rng`` either way, so one image's draw
    does not shift the next one's.
    """
    chance = (
        policy.with_finding if policy.finding in _scene_kinds(scene) else policy.without_finding
    )
    planted, right, bottom = rng.random(3)
    mx, my = rng.uniform(*_MARKER_MARGIN, size=2)
    if planted >= chance:
        return scene
    rows, cols = len(_MARKER_GLYPH), len(_MARKER_GLYPH[0])
    x0 = 1.0 - mx - cols * _MARKER_CELL if right < 0.5 else mx
    y0 = 1.0 - my - rows * _MARKER_CELL if bottom < 0.5 else my
    return replace(scene, marker=(float(x0), float(y0)))


def _smooth_field(seed: int, width: int, height: int, cells: int = 6) -> np.ndarray:
    """Low-frequency texture: a coarse random grid bilinearly upsampled to (H, W)."""
    coarse = np.random.default_rng(seed).normal(0, 1, size=(cells + 1, cells + 1))
    gx = (np.arange(width) + 0.5) / width * cells
    gy = (np.arange(height) + 0.5) / height * cells
    x0 = np.minimum(gx.astype(int), cells - 1)
    y0 = np.minimum(gy.astype(int), cells - 1)
    fx = (gx - x0)[None, :]
    fy = (gy - y0)[:, None]
    c00 = coarse[y0][:, x0]
    c01 = coarse[y0][:, x0 + 1]
    c10 = coarse[y0 + 1][:, x0]
    c11 = coarse[y0 + 1][:, x0 + 1]
    return c00 * (1 - fx) * (1 - fy) + c01 * fx * (1 - fy) + c10 * (1 - fx) * fy + c11 * fx * fy


def _soft_step(distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a smooth edge of width ``edge``."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / max(edge, 1e-6), -50, 50)))


def _bezier(points: tuple[tuple[float, float], ...], samples: int) -> np.ndarray:
    (ax, ay), (bx, by), (cx, cy) = points
    t = np.linspace(0, 1, samples)[:, None]
    a, b, c = np.array([ax, ay]), np.array([bx, by]), np.array([cx, cy])
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c


@dataclass(frozen=True)
class _Grid:
    """The pixel grid a scene is rendered on: the pixel centres in unit-square units,
    ``xs`` ``(1, W)`` and ``ys`` ``(H, 1)``, and one pixel in those units (``px``)."""

    width: int
    height: int
    xs: np.ndarray
    ys: np.ndarray
    px: float

    @classmethod
    def of(cls, width: int, height: int) -> _Grid:
        return cls(
            width=width,
            height=height,
            xs=((np.arange(width) + 0.5) / width)[None, :],
            ys=((np.arange(height) + 0.5) / height)[:, None],
            # Anisotropic for non-square images: edges are a pixel wide whatever the
            # resolution, so scenes look alike at any size.
            px=1.0 / min(width, height),
        )

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """A box in unit-square units → pixels, clipped to the image."""
        return (
            max(0.0, float(x0) * self.width),
            max(0.0, float(y0) * self.height),
            min(float(self.width), float(x1) * self.width),
            min(float(self.height), float(y1) * self.height),
        )


def _anatomy(scene: _Scene, grid: _Grid) -> np.ndarray:
    """The body, the spine and mediastinum, the two lung fields and a soft texture."""
    xs, ys = grid.xs, grid.ys
    body = _soft_step(np.hypot((xs - 0.5) / 0.44, (ys - 0.55) / 0.5) - 1.0, 0.02)
    image = 0.08 + 0.5 * body
    image = image + 0.12 * np.exp(-(((xs - 0.5) / 0.05) ** 2)) * body  # spine / mediastinum
    for cx, cy, rx, ry in scene.lungs:
        lung = _soft_step(np.hypot((xs - cx) / rx, (ys - cy) / ry) - 1.0, 0.06)
        image = image - 0.28 * lung
    return image + 0.03 * _smooth_field(scene.texture_seed, grid.width, grid.height)


def _add_nodules(
    image: np.ndarray, scene: _Scene, grid: _Grid, findings: list[Finding]
) -> np.ndarray:
    """``image`` with the scene's nodules (round spots); their findings appended."""
    xs, ys = grid.xs, grid.ys
    for cx, cy, r in scene.nodules:
        d = np.hypot(xs - cx, ys - cy) - r
        image = image + 0.32 * _soft_step(d, max(grid.px, r * 0.25))
        findings.append(Finding("nodule", grid.box(cx - r, cy - r, cx + r, cy + r)))
    return image


def _add_masses(
    image: np.ndarray, scene: _Scene, grid: _Grid, findings: list[Finding]
) -> np.ndarray:
    """``image`` with the scene's masses (lumps whose radius wobbles with the angle);
    their findings appended."""
    xs, ys = grid.xs, grid.ys
    for cx, cy, r, harmonics in scene.masses:
        angle = np.arctan2(ys - cy, xs - cx)
        wobble = 1.0 + sum(h * np.cos((k + 2) * angle + k) for k, h in enumerate(harmonics))
        d = np.hypot(xs - cx, ys - cy) - r * wobble
        image = image + 0.24 * _soft_step(d, max(grid.px, r * 0.15))
        reach = r * (1.0 + sum(abs(h) for h in harmonics))
        findings.append(Finding("mass", grid.box(cx - reach, cy - reach, cx + reach, cy + reach)))
    return image


def _add_opacities(
    image: np.ndarray, scene: _Scene, grid: _Grid, findings: list[Finding]
) -> np.ndarray:
    """``image`` with the scene's opacities (broad Gaussian hazes); their findings appended."""
    xs, ys = grid.xs, grid.ys
    for cx, cy, sigma in scene.opacities:
        image = image + 0.2 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
        # The haze is visible to about 1.5 sigma; that is its box.
        s = 1.5 * sigma
        findings.append(Finding("opacity", grid.box(cx - s, cy - s, cx + s, cy + s)))
    return image


def _add_tubes(
    image: np.ndarray, scene: _Scene, grid: _Grid, findings: list[Finding]
) -> np.ndarray:
    """``image`` with the scene's tubes (thin bright curves); their findings appended."""
    xs, ys, px = grid.xs, grid.ys, grid.px
    for control in scene.tubes:
        curve = _bezier(control, 200)
        d = np.full((grid.height, grid.width), np.inf)
        # Distance to the polyline, sampled densely: exact enough for a 1-2 px line.
        for x, y in curve[::2]:
            d = np.minimum(d, np.hypot(xs - x, ys - y))
        half_width = max(0.005, 0.9 * px)
        image = image + 0.4 * _soft_step(d - half_width, px * 0.7)
        x0, y0 = curve.min(axis=0)
        x1, y1 = curve.max(axis=0)
        findings.append(
            Finding("tube", grid.box(x0 - half_width, y0, x1 + half_width, y1 + half_width))
        )
    return image


def _marker_cover(corner: tuple[float, float], grid: _Grid) -> np.ndarray:
    """How much of each pixel ``(H, W)`` the marker's glyph, its top left at ``corner``,
    covers. Each lit cell of the glyph is a square, the letter their union. Its edges are
    antialiased by a linear ramp one pixel wide (a pixel's covered area), not a soft
    step: nothing beyond half a pixel of the box changes, so the marker's box is all it
    touches."""
    x0, y0 = corner
    cover = np.zeros((grid.height, grid.width))
    half = _MARKER_CELL / 2
    for row, line in enumerate(_MARKER_GLYPH):
        for col, cell in enumerate(line):
            if cell != "#":
                continue
            cx = x0 + (col + 0.5) * _MARKER_CELL
            cy = y0 + (row + 0.5) * _MARKER_CELL
            outside_px = np.maximum(
                (np.abs(grid.xs - cx) - half) * grid.width,
                (np.abs(grid.ys - cy) - half) * grid.height,
            )
            cover = np.maximum(cover, np.clip(0.5 - outside_px, 0.0, 1.0))
    return cover


def _render(scene: _Scene, width: int, height: int) -> Phantom:
    """``scene`` at ``width`` × ``height``: the anatomy, the findings (in the order of
    ``FINDINGS``), the marker over them, and the scene's noise."""
    grid = _Grid.of(width, height)
    findings: list[Finding] = []
    image = _anatomy(scene, grid)
    image = _add_nodules(image, scene, grid, findings)
    image = _add_masses(image, scene, grid, findings)
    image = _add_opacities(image, scene, grid, findings)
    image = _add_tubes(image, scene, grid, findings)
    marker = None
    if scene.marker is not None:
        x0, y0 = scene.marker
        cover = _marker_cover(scene.marker, grid)
        image = image * (1 - cover) + _MARKER_LEVEL * cover
        rows, cols = len(_MARKER_GLYPH), len(_MARKER_GLYPH[0])
        marker = grid.box(x0, y0, x0 + cols * _MARKER_CELL, y0 + rows * _MARKER_CELL)
    noise = np.random.default_rng(scene.noise_seed).normal(0, 0.015, size=(height, width))
    image = np.clip(image + noise, 0.0, 1.0).astype(np.float32)
    return Phantom(image=image, findings=tuple(findings), marker=marker)


def sample_phantom(rng: np.random.Generator, width: int, height: int) -> Phantom:
    """Draw one random scene from ``rng`` and render it at ``width`` × ``height``."""
    return _render(_sample_scene(rng), width, height)


def iter_phantoms(
    seed: int,
    size: int | tuple[int, int] = 128,
    marker: MarkerPolicy | None = None,
    require: str | None = None,
) -> Iterator[Phantom]:
    """Endless seeded phantoms at ``size`` (an int, or ``(width, height)``).

    ``marker``: plant the marker as the policy says (the scenes stay those of the
    same seed without it). ``require``: only the scenes that show this finding,
    skipped before they are rendered (the ones kept are those of the full sequence).
    """
    if require is not None and require not in FINDINGS:
        raise ValueError(f"require must be one of {FINDINGS}, not {require!r}")
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    marker_rng = np.random.default_rng([seed, _MARKER_STREAM])
    while True:
        scene = _sample_scene(rng)
        if marker is not None:
            scene = _plant_marker(scene, marker_rng, marker)
        if require is None or require in _scene_kinds(scene):
            yield _render(scene, width, height)


def make_dataset(
    count: int,
    seed: int,
    size: int | tuple[int, int] = 128,
    marker: MarkerPolicy | None = None,
) -> list[Phantom]:
    """The first ``count`` phantoms of ``iter_phantoms(seed, size, marker)``."""
    return list(islice(iter_phantoms(seed, size, marker), count))
