"""An explanation's faithfulness in the answer: the engine's deletion and insertion curves
(``engine/faithfulness.py``, where the definition is) and the areas under them."""

from __future__ import annotations

import numpy as np

from service.contract.responses import Faithfulness


def auc(curve: np.ndarray) -> float:
    """Area under ``curve`` (scores at the fractions 0, 1/n, … 1) by the trapezoid rule."""
    values = np.asarray(curve, dtype=np.float64)
    step = 1.0 / (len(values) - 1)
    return float(step * (values.sum() - (values[0] + values[-1]) / 2))


def faithfulness(curves: np.ndarray) -> Faithfulness:
    """The answer's view of one ``(2, 21)`` pair of curves (deletion, insertion)."""
    # float32 softmax may round a hair past 1.
    deletion, insertion = np.clip(np.asarray(curves, dtype=np.float64), 0.0, 1.0)
    return Faithfulness(
        deletion_auc=round(auc(deletion), 6),
        insertion_auc=round(auc(insertion), 6),
        deletion=[round(float(v), 6) for v in deletion],
        insertion=[round(float(v), 6) for v in insertion],
    )
