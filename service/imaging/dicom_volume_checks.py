"""The geometry of a stack of DICOM slices, checked from the headers before any pixel is
decoded: one size, one orientation and one pixel spacing, no two slices at one place, one
step between neighbours; then the order of the slices and the voxel → RAS+ affine.

The slices are put in the order of their position along the normal of their plane
(row cosine × column cosine), which the standard defines, never by InstanceNumber or file
name, which it does not tie to a place. Each slice's ImagePositionPatient is the patient
position of its first pixel (PS3.3 C.7.6.2.1.1), so the affine's slice column is the step
from the first slice to the last divided by their distance in slices: along the normal
for an ordinary stack, with the in-plane shift of a tilted gantry where there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.contract.errors import ErrorCode, InvalidField

# Cosines agree within this (scanners write them with 6 to 16 digits).
ORIENTATION_TOLERANCE = 1e-4
# Two slices closer than this along the normal are one place twice.
DUPLICATE_MM = 0.01
# A step may differ from the expected one by this much, or this share of it, whichever
# is more: positions are decimal strings, rounded by the scanner that wrote them.
STEP_MM, STEP_SHARE = 0.01, 0.01
# Pixel spacings agree within this share.
SPACING_SHARE = 1e-4


def invalid_volume(index: int, message: str) -> InvalidField:
    """The volume in ``images[index]`` cannot be read: a 422 ``invalid_volume`` saying why."""
    return InvalidField(
        message, code=ErrorCode.INVALID_VOLUME, image=index, field=f"images[{index}]"
    )


def mm(value: float) -> str:
    """Millimetres as a person reads them: 12.5 mm, 0.625 mm, -30 mm."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{'0' if text in ('', '-0') else text} mm"


def numbers(ds: Any, keyword: str, count: int, where: str, index: int) -> np.ndarray:
    """The ``count`` finite numbers of attribute ``keyword`` of ``ds`` as ``(count,)
    float64``; a missing or malformed value is refused, naming ``where`` it is missing."""
    values: list[float] = []
    try:
        value = ds.get(keyword) if ds is not None else None
        if value is not None:
            values = [float(v) for v in (value if count > 1 else [value])]
    except (TypeError, ValueError, OverflowError):
        values = []
    if len(values) != count or not np.isfinite(values).all():
        raise invalid_volume(
            index,
            f"{where.capitalize()} has no valid {keyword} ({count} "
            f"number{'s' if count > 1 else ''}), which every slice of a volume needs.",
        )
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class Plane:
    """One slice's place as its header states it, in DICOM's LPS+ millimetres:
    ``position`` ImagePositionPatient ``(3,)``, ``row`` and ``column`` its direction
    cosines ``(3,)``, ``spacing`` PixelSpacing (between rows, between columns) and
    ``size`` (rows, columns)."""

    position: np.ndarray
    row: np.ndarray
    column: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]


@dataclass(frozen=True)
class Stack:
    """The planes in slice order (``order[k]`` is the number of the plane that is slice
    ``k``) and the affine ``(4, 4) float64`` from voxel ``(i column, j row, k slice)``
    to RAS+ millimetres."""

    order: tuple[int, ...]
    affine: np.ndarray


def plane(sources: Sequence[Any], size: tuple[int, int], where: str, index: int) -> Plane:
    """The plane of a slice from the datasets holding its ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing (a single-frame file three times, or a
    frame's functional group items)."""
    position = numbers(sources[0], "ImagePositionPatient", 3, where, index)
    cosines = numbers(sources[1], "ImageOrientationPatient", 6, where, index)
    spacing = numbers(sources[2], "PixelSpacing", 2, where, index)
    row, column = cosines[:3], cosines[3:]
    unit = np.allclose(np.linalg.norm(cosines.reshape(2, 3), axis=1), 1.0, atol=1e-3)
    if not unit or abs(float(row @ column)) > 1e-3:
        raise invalid_volume(
            index,
            f"{where.capitalize()} has an ImageOrientationPatient that is not two "
            "perpendicular unit vectors.",
        )
    if (spacing <= 0).any():
        raise invalid_volume(
            index, f"{where.capitalize()} has a PixelSpacing that is not positive."
        )
    return Plane(position, row, column, (float(spacing[0]), float(spacing[1])), size)


def _check_alike(first: Plane, other: Plane, noun: str, number: int, index: int) -> None:
    """Refuse a slice whose size, orientation or pixel spacing is not the first one's."""
    where = f"{noun} {number} of images[{index}]"
    if other.size != first.size:
        (rows, columns), (rows_0, columns_0) = other.size, first.size
        raise invalid_volume(
            index,
            f"{where.capitalize()} is {columns}×{rows} pixels but {noun} 0 is "
            f"{columns_0}×{rows_0}; the slices of a volume are all one size.",
        )
    cosines = np.concatenate([other.row - first.row, other.column - first.column])
    if np.abs(cosines).max() > ORIENTATION_TOLERANCE:
        raise invalid_volume(
            index,
            f"{where.capitalize()} is oriented differently from {noun} 0 "
            "(ImageOrientationPatient); the slices of a volume are parallel, so send one "
            "orientation at a time.",
        )
    if not np.allclose(other.spacing, first.spacing, rtol=SPACING_SHARE, atol=0):
        raise invalid_volume(
            index,
            f"{where.capitalize()} has a PixelSpacing of {mm(other.spacing[0])} × "
            f"{mm(other.spacing[1])} but {noun} 0 of {mm(first.spacing[0])} × "
            f"{mm(first.spacing[1])}; the slices of a volume share one pixel spacing.",
        )


def _check_duplicates(heights: np.ndarray, order: np.ndarray, noun: str, index: int) -> None:
    """Refuse two slices at one position along the normal (``heights`` sorted)."""
    same = np.flatnonzero(np.diff(heights) < DUPLICATE_MM)
    if same.size == 0:
        return
    k = int(same[0])
    first, second = sorted((int(order[k]), int(order[k + 1])))
    raise invalid_volume(
        index,
        f"{noun.capitalize()}s {first} and {second} of images[{index}] are at the same "
        f"position ({mm(heights[k])} along the slice normal); a volume has one slice per "
        "position. Is one slice sent twice, or are two series or two stacks mixed?",
    )


def _between(heights: np.ndarray, order: np.ndarray, noun: str, k: int) -> str:
    """Slices ``k`` and ``k + 1`` of the sorted stack, named as sent."""
    return (
        f"{noun} {int(order[k])} (at {mm(heights[k])}) and {noun} {int(order[k + 1])} "
        f"(at {mm(heights[k + 1])} along the slice normal)"
    )


def _check_steps(heights: np.ndarray, order: np.ndarray, noun: str, index: int) -> None:
    """One step between neighbouring slices (``heights`` sorted, no duplicates). When
    every step is a whole multiple of the smallest, the larger ones are missing slices;
    otherwise the spacing is uneven, told against the median step."""
    steps = np.diff(heights)
    smallest = float(steps.min())
    times = np.rint(steps / smallest)
    if (np.abs(steps - times * smallest) <= _tolerance(smallest) * times).all():
        gaps = np.flatnonzero(times > 1)
        if gaps.size:
            k = int(gaps[0])
            missing = int(times[k]) - 1
            raise invalid_volume(
                index,
                f"A slice is missing from images[{index}]: between "
                f"{_between(heights, order, noun, k)} "
                f"{'1 slice is' if missing == 1 else f'{missing} slices are'} missing, where "
                f"the other slices are {mm(smallest)} apart.",
            )
        return
    usual = float(np.median(steps))
    k = int(np.argmax(np.abs(steps - usual) > _tolerance(usual)))
    raise invalid_volume(
        index,
        f"The slices of images[{index}] are unevenly spaced: {mm(float(steps[k]))} between "
        f"{_between(heights, order, noun, k)}, where most are {mm(usual)} apart; a volume "
        "needs one step between all its slices.",
    )


def _tolerance(step: float) -> float:
    """How far a step may stray from ``step`` (positions are rounded decimal strings)."""
    return max(STEP_MM, STEP_SHARE * step)


def _affine(planes: Sequence[Plane], order: Sequence[int], index: int) -> np.ndarray:
    """Voxel (i column, j row, k slice) → RAS+ mm; refuse slices whose positions do not
    lie on one straight line (in-plane shifts that change from slice to slice)."""
    first, last = planes[order[0]], planes[order[-1]]
    slices = len(order)
    across = (last.position - first.position) / (slices - 1)
    expected = first.position + np.arange(slices)[:, None] * across
    actual = np.stack([planes[n].position for n in order])
    off = np.linalg.norm(actual - expected, axis=1).max()
    if off > max(STEP_MM, STEP_SHARE * float(np.linalg.norm(across))):
        raise invalid_volume(
            index,
            f"The slices of images[{index}] are not stacked along a straight line: a slice "
            f"is {mm(float(off))} away from where its neighbours place it.",
        )
    affine = np.eye(4)
    delta_rows, delta_columns = first.spacing
    affine[:3, 0] = first.row * delta_columns
    affine[:3, 1] = first.column * delta_rows
    affine[:3, 2] = across
    affine[:3, 3] = first.position
    # DICOM's patient axes are LPS+; RAS+ negates x and y.
    affine[:2] *= -1
    return affine


def stack(planes: Sequence[Plane], noun: str, index: int) -> Stack:
    """The order and affine of ``planes`` (``noun`` names one in messages: "file" or
    "frame", numbered from 0 as sent); refuses what is not one evenly spaced stack."""
    if len(planes) < 2:
        raise invalid_volume(
            index,
            f"The volume in images[{index}] has {len(planes)} slice"
            f"{'' if len(planes) == 1 else 's'}; a volume needs at least 2.",
        )
    for number, other in enumerate(planes[1:], start=1):
        _check_alike(planes[0], other, noun, number, index)
    normal = np.cross(planes[0].row, planes[0].column)
    heights = np.array([float(p.position @ normal) for p in planes])
    order = np.argsort(heights, kind="stable")
    _check_duplicates(heights[order], order, noun, index)
    _check_steps(heights[order], order, noun, index)
    ordered = tuple(int(n) for n in order)
    return Stack(ordered, _affine(planes, ordered, index))
