"""Pixel values that arithmetic can trust: no NaN or infinity reaches the model."""

from __future__ import annotations

import numpy as np

from service.contract.errors import ErrorCode, InvalidField


def finite(values: np.ndarray, index: int) -> np.ndarray:
    """``values`` with NaN and -inf set to the lowest finite value and +inf to the
    highest (float TIFFs and DICOMs use NaN for "no data"); 422 if none is finite."""
    if values.dtype.kind != "f":
        return values
    mask = np.isfinite(values)
    if mask.all():
        return values
    if not mask.any():
        raise InvalidField(
            f"Image {index} has no finite pixel values (only NaN or infinity).",
            code=ErrorCode.INVALID_IMAGE,
            image=index,
            field=f"images[{index}]",
        )
    low, high = float(values[mask].min()), float(values[mask].max())
    return np.nan_to_num(values, nan=low, posinf=high, neginf=low)
