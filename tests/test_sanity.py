"""The sanity check (``service/trust/``): its measures against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from service.trust.similarity import spearman, ssim

# --- the measures -------------------------------------------------------------------


def _map_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    noise = rng.random((64, 48))
    yy, xx = np.mgrid[0:40, 0:56] / 40.0
    blob = np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.05)
    moved = np.exp(-((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.08)
    relu = np.maximum(rng.standard_normal((32, 32)), 0)
    return [
        (noise, np.clip(noise + 0.3 * rng.standard_normal(noise.shape), 0, 1)),
        (blob, moved),
        (blob, 1 - blob),
        (relu / relu.max(), np.zeros_like(relu)),
    ]


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    for a, b in _map_pairs():
        reference = metrics.structural_similarity(
            a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ssim(a, b) == pytest.approx(reference, abs=1e-9)


def test_ssim_identities() -> None:
    for a, b in _map_pairs():
        assert ssim(a, a) == pytest.approx(1.0)
        assert ssim(a, b) == pytest.approx(ssim(b, a))
        assert ssim(a, b) < 1.0
    _, blob = _map_pairs()[1]
    assert ssim(blob, 1 - blob) < 0  # anti-correlated structure
    with pytest.raises(ValueError):
        ssim(np.zeros((10, 40)), np.zeros((10, 40)))  # smaller than the 11×11 window


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = np.maximum(rng.standard_normal((20, 30)), 0)  # ReLU'd: many ties at 0
        b = np.maximum(a + rng.standard_normal(a.shape), 0)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0])


def test_spearman_identities() -> None:
    a = np.random.default_rng(2).random((16, 16))
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, np.exp(5 * a)) == pytest.approx(1.0)  # ranks only
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.zeros_like(a)))  # a constant map ranks nothing
