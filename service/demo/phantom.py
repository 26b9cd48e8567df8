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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINDINGS: tuple[str, ...] = ("nodule", "mass", "opacity", "tube")

# Probability that an image shows each kind of finding (independently).
_PREVALENCE = 0.4


@dataclass(frozen=True)
class Finding:
    """One finding and its box ``(x0, y0, x1, y1)`` in pixels of the rendered image."""

    kind: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom: ``image`` is ``(H, W) float32`` in [0, 1]."""

    image: np.ndarray
    findings: tuple[Finding, ...]

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


def _render(scene: _Scene, width: int, height: int) -> Phantom:
    xs = ((np.arange(width) + 0.5) / width)[None, :]
    ys = ((np.arange(height) + 0.5) / height)[:, None]
    # One pixel in unit-square units (anisotropic for non-square images): edges
    # are a pixel wide whatever the resolution, so scenes look alike at any size.
    px = 1.0 / min(width, height)

    body = _soft_step(np.hypot((xs - 0.5) / 0.44, (ys - 0.55) / 0.5) - 1.0, 0.02)
    image = 0.08 + 0.5 * body
    image = image + 0.12 * np.exp(-(((xs - 0.5) / 0.05) ** 2)) * body  # spine / mediastinum
    for cx, cy, rx, ry in scene.lungs:
        lung = _soft_step(np.hypot((xs - cx) / rx, (ys - cy) / ry) - 1.0, 0.06)
        image = image - 0.28 * lung
    image = image + 0.03 * _smooth_field(scene.texture_seed, width, height)

    findings: list[Finding] = []

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (
            max(0.0, float(x0) * width),
            max(0.0, float(y0) * height),
            min(float(width), float(x1) * width),
            min(float(height), float(y1) * height),
        )

    for cx, cy, r in scene.nodules:
        d = np.hypot(xs - cx, ys - cy) - r
        image = image + 0.32 * _soft_step(d, max(px, r * 0.25))
        findings.append(Finding("nodule", box(cx - r, cy - r, cx + r, cy + r)))
    for cx, cy, r, harmonics in scene.masses:
        angle = np.arctan2(ys - cy, xs - cx)
        wobble = 1.0 + sum(h * np.cos((k + 2) * angle + k) for k, h in enumerate(harmonics))
        d = np.hypot(xs - cx, ys - cy) - r * wobble
        image = image + 0.24 * _soft_step(d, max(px, r * 0.15))
        reach = r * (1.0 + sum(abs(h) for h in harmonics))
        findings.append(Finding("mass", box(cx - reach, cy - reach, cx + reach, cy + reach)))
    for cx, cy, sigma in scene.opacities:
        image = image + 0.2 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
        # The haze is visible to about 1.5 sigma; that is its box.
        s = 1.5 * sigma
        findings.append(Finding("opacity", box(cx - s, cy - s, cx + s, cy + s)))
    for control in scene.tubes:
        curve = _bezier(control, 200)
        d = np.full((height, width), np.inf)
        # Distance to the polyline, sampled densely: exact enough for a 1-2 px line.
        for x, y in curve[::2]:
            d = np.minimum(d, np.hypot(xs - x, ys - y))
        half_width = max(0.005, 0.9 * px)
        image = image + 0.4 * _soft_step(d - half_width, px * 0.7)
        x0, y0 = curve.min(axis=0)
        x1, y1 = curve.max(axis=0)
        findings.append(Finding("tube", box(x0 - half_width, y0, x1 + half_width, y1 + half_width)))

    noise = np.random.default_rng(scene.noise_seed).normal(0, 0.015, size=(height, width))
    image = np.clip(image + noise, 0.0, 1.0).astype(np.float32)
    return Phantom(image=image, findings=tuple(findings))


def sample_phantom(rng: np.random.Generator, width: int, height: int) -> Phantom:
    """Draw one random scene from ``rng`` and render it at ``width`` × ``height``."""
    return _render(_sample_scene(rng), width, height)


def make_dataset(count: int, seed: int, size: int | tuple[int, int] = 128) -> list[Phantom]:
    """``count`` phantoms rendered at ``size`` (an int, or ``(width, height)``)."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return [sample_phantom(rng, width, height) for _ in range(count)]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W) float32`` in [0, 1] → ``(H, W) uint8`` for saving as PNG."""
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
