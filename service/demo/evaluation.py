"""Evaluation measures for the demo model: ROC AUC and the pointing game."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve for one class (Mann-Whitney U, ties count half).

    ``scores`` and ``labels`` are ``(N,)``; labels are 0/1.
    """
    positives = labels > 0.5
    n_pos = int(positives.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative examples")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties so equal scores count as half a win.
    start = 0
    while start < len(sorted_scores):
        end = start
        while end + 1 < len(sorted_scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = ranks[positives].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auc(scores: np.ndarray, labels: np.ndarray) -> list[float]:
    """AUC per column of ``(N, K)`` scores and labels."""
    return [roc_auc(scores[:, k], labels[:, k]) for k in range(scores.shape[1])]


def mean_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(per_class_auc(scores, labels)))


def peak_in_boxes(
    heatmap: np.ndarray, boxes: Sequence[tuple[float, float, float, float]], grow_px: float
) -> bool:
    """Pointing game hit: the heatmap's maximum lies in one of ``boxes`` grown by ``grow_px``.

    ``heatmap`` is ``(H, W)`` on the image's pixel grid; boxes are ``(x0, y0, x1, y1)``
    in pixels; the peak pixel counts by its centre.
    """
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    cx, cy = x + 0.5, y + 0.5
    return any(
        x0 - grow_px <= cx <= x1 + grow_px and y0 - grow_px <= cy <= y1 + grow_px
        for x0, y0, x1, y1 in boxes
    )
