"""How alike two heatmaps are: Spearman rank correlation and SSIM (numpy only).

- ``spearman``: the Pearson correlation of the two maps' ranks, ties given their
  average rank (a Grad-CAM map is ReLU'd, so many pixels tie at 0). It only asks
  whether the same pixels come first, not how much hotter they are, which is what
  Adebayo et al. (2018) compare. Undefined (``nan``) when either map is constant:
  a constant map ranks nothing.
- ``ssim``: the structural similarity of Wang et al. (2004) on maps in [0, 1]
  (data range 1): a Gaussian window with σ = 1.5 truncated at 3.5 σ (11 × 11),
  ``K1 = 0.01``, ``K2 = 0.03``, population (not sample) variances, and the mean of
  the SSIM map over the pixels whose window lies inside the image. These are the
  settings of scikit-image's ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)``, which the tests hold it to.
"""

from __future__ import annotations

import numpy as np

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Window radius: the Gaussian cut at 3.5 σ, as scipy's filter (and so scikit-image) cuts it.
_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0 … n-1 of flat ``values``, each run of ties at its average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = (ends - counts + ends - 1) / 2.0
    return average[inverse.ravel()]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of the same shape; ``nan`` if either is
    constant (see the module docstring)."""
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
    ra = _ranks(np.asarray(a, dtype=np.float64).ravel())
    rb = _ranks(np.asarray(b, dtype=np.float64).ravel())
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / denominator, -1.0, 1.0))


def _gaussian_window() -> np.ndarray:
    x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    window = np.exp(-(x * x) / (2 * SSIM_SIGMA**2))
    return window / window.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``(H, W)`` → ``(H - 2r, W - 2r)``: the separable window's weighted mean at each
    pixel whose window lies wholly inside."""
    size = window.shape[0]
    height, width = x.shape
    rows = sum(w * x[k : k + height - size + 1, :] for k, w in enumerate(window))
    return np.asarray(sum(w * rows[:, k : k + width - size + 1] for k, w in enumerate(window)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two ``(H, W)`` maps in [0, 1], each side at least 11 pixels."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM compares two (H, W) maps, not {a.shape} and {b.shape}")
    if min(a.shape) < 2 * _RADIUS + 1:
        raise ValueError(f"SSIM needs maps of at least {2 * _RADIUS + 1} pixels a side")
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    window = _gaussian_window()
    mx, my = _filter_valid(x, window), _filter_valid(y, window)
    vx = _filter_valid(x * x, window) - mx * mx
    vy = _filter_valid(y * y, window) - my * my
    cxy = _filter_valid(x * y, window) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K · data range)², the data range being 1
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())
