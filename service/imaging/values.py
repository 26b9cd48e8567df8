"""Pixel values that arithmetic can trust: no NaN or infinity reaches the model; values
in [0, 1] as 8-bit levels, one rounding everywhere."""

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


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) as ``uint8`` levels ``round(v × 255)``, half to even,
    computed in the values' own float type (a float32 map in float32): every picture,
    heatmap and saved phantom is made 8-bit here."""
    kind = values.dtype if values.dtype.kind == "f" else np.dtype(np.float64)
    scaled = np.multiply(values, 255, dtype=kind)
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)
