"""A volume's map as a picture a person reads at a glance: three orthogonal slices through
the map's peak (axial, coronal, sagittal, left to right), each coloured over the volume.

Each slice is shown as radiologists look at it, whatever the grid's own orientation: the
grid is turned to RAS+ first (by its affine's nearest axes), then axial and coronal
slices put the patient's right on the viewer's left, anterior (axial) or superior
(coronal, sagittal) up, and the sagittal slice anterior on the left. Voxels keep their
proportions in millimetres; each slice is scaled to ``VIEW_SIDE`` pixels on its longer
side. A thin cross marks the peak in each slice.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from service.imaging.render import colour_image, overlay_image
from service.imaging.values import to_uint8
from service.imaging.volume import peak_index

VIEW_SIDE = 320
_GAP = 4
_NAMES = ("axial", "coronal", "sagittal")


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` with its axes turned to RAS+, and the voxel size along each (mm)."""
    from nibabel import orientations

    ornt = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(("R", "A", "S"))
    )
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return orientations.apply_orientation(array, ornt), spacing[ornt[:, 0].argsort()]


def _slices(ras: np.ndarray, at: tuple[int, int, int]) -> list[np.ndarray]:
    """The three slices through ``at`` as (rows, columns) seen on screen."""
    x, y, z = at
    axial = ras[::-1, ::-1, z].T  # rows: anterior at the top; columns: right → left
    coronal = ras[::-1, y, ::-1].T  # rows: superior at the top
    sagittal = ras[x, ::-1, ::-1].T  # columns: anterior on the left
    return [np.ascontiguousarray(axial), np.ascontiguousarray(coronal), sagittal.copy()]


def _shown_at(at: tuple[int, int, int], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Where ``at`` falls in each slice of ``_slices``, as (row, column)."""
    x, y, z = at
    nx, ny, nz = shape
    return [(ny - 1 - y, nx - 1 - x), (nz - 1 - z, nx - 1 - x), (nz - 1 - z, ny - 1 - y)]


def _physical(image: Image.Image, mm: tuple[float, float]) -> Image.Image:
    """``image`` resized so that a pixel is as tall as wide in mm, ``VIEW_SIDE`` long."""
    height_mm, width_mm = image.height * mm[0], image.width * mm[1]
    scale = VIEW_SIDE / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def three_views(
    heat: np.ndarray, affine: np.ndarray, base: np.ndarray | None, style: str
) -> np.ndarray:
    """The picture of a volume map: ``heat`` ``(a, b, c)`` in [0, 1] on the grid ``affine``
    places; ``base`` the volume on that grid in [0, 1] (for ``overlay``); ``style`` one
    of ``png`` (colour map), ``gray`` (levels), ``overlay``. ``(H, W[, 3]) uint8``."""
    ras_heat, spacing = _to_ras(heat, affine)
    ras_base = _to_ras(base, affine)[0] if base is not None else None
    at = peak_index(ras_heat)
    mm = [(spacing[1], spacing[0]), (spacing[2], spacing[0]), (spacing[2], spacing[1])]
    marks = _shown_at(at, ras_heat.shape)
    panels: list[Image.Image] = []
    bases = _slices(ras_base, at) if ras_base is not None else [None] * 3
    for levels, under, mark, size in zip(_slices(ras_heat, at), bases, marks, mm, strict=True):
        native = _panel(to_uint8(levels), under, style)
        shown = _physical(native, size)
        # The peak voxel's centre, scaled with the slice (half-pixel centres).
        row = (mark[0] + 0.5) * shown.height / native.height - 0.5
        column = (mark[1] + 0.5) * shown.width / native.width - 0.5
        _cross(shown, round(row), round(column))
        panels.append(shown)
    width = sum(panel.width for panel in panels) + _GAP * 2
    height = max(panel.height for panel in panels)
    mode = "L" if style == "gray" else "RGB"
    picture = Image.new(mode, (width, height), 0)
    left = 0
    for panel, name in zip(panels, _NAMES, strict=True):
        picture.paste(panel, (left, 0))
        ImageDraw.Draw(picture).text((left + 4, 2), name, fill=255 if mode == "L" else "white")
        left += panel.width + _GAP
    return np.asarray(picture)


def _panel(levels: np.ndarray, under: np.ndarray | None, style: str) -> Image.Image:
    """One slice drawn in ``style``."""
    if style == "gray":
        return Image.fromarray(levels)
    if style == "overlay" and under is not None:
        return overlay_image(Image.fromarray(to_uint8(under)).convert("RGB"), levels)
    return colour_image(levels)


def _cross(image: Image.Image, row: int, column: int) -> None:
    """A thin cross around (row, column), open at its centre so the peak stays visible."""
    draw = ImageDraw.Draw(image)
    arm = max(4, min(image.size) // 12)
    colour = 255 if image.mode == "L" else "white"
    gap = 3
    draw.line([(column - arm, row), (column - gap, row)], fill=colour)
    draw.line([(column + gap, row), (column + arm, row)], fill=colour)
    draw.line([(column, row - arm), (column, row - gap)], fill=colour)
    draw.line([(column, row + gap), (column, row + arm)], fill=colour)
