"""What one volume costs a request, checked from its header before a voxel is read.

A volume is charged like an image (``budgets.RequestBudget``), with its own figures:
its voxels against ``max_volume_voxels`` (all the request's volumes together), its
``array`` maps against ``max_array_values``, its pictures (three slices per map) against
``max_output_pixels``, and its memory, reserved before the volume is decoded:

- reading and fitting it: the file inflated, its voxels in float32, the orientation's
  copy, the resampled and windowed grids: at most ``FIT_BYTES_PER_VOXEL`` a voxel;
- each map at its size: float32, and the passes that take it back to the file's grid
  (``DRAW_BYTES_PER_VOXEL``), one map at a time;
- the answer: ``array`` values as JSON, ``nifti`` maps gzipped in base64 (at most their
  float32 size, smooth maps compress well) and ``dicom-pm`` Parametric Maps (float32,
  uncompressed) in base64, three copies on the way out.
"""

from __future__ import annotations

import math

from service.contract.errors import ErrorCode, PayloadTooLarge
from service.contract.settings import Settings
from service.pipeline.budgets import (
    ANSWER_COPIES,
    ARRAY_ANSWER_BYTES_PER_VALUE,
    PICTURE_ANSWER_BYTES_PER_PIXEL,
    RequestBudget,
)

FIT_BYTES_PER_VOXEL = 24
DRAW_BYTES_PER_VOXEL = 16
NIFTI_ANSWER_BYTES_PER_VOXEL = int(4 * 4 / 3 * ANSWER_COPIES)
IMAGE_ANSWER_BYTES_PER_VOXEL = int(1 * 4 / 3 * ANSWER_COPIES) + 1
# A volume's picture: three slices, each at most this many pixels a side.
VIEW_SIDE = 320
PICTURE_PIXELS = 3 * VIEW_SIDE * VIEW_SIDE


def series_fetch_limit(settings: Settings) -> int:
    """The most bytes a whole series fetched from a DICOMweb server may hold: its voxels
    at 16 bits within ``max_volume_voxels``, headers and multipart framing beside them."""
    return 2 * settings.max_volume_voxels + settings.max_request_bytes


def map_voxels(budget: RequestBudget, shape: tuple[int, int, int]) -> int:
    """Voxels of one map of a volume of ``shape`` at the request's heatmap size."""
    if budget.options.size == "original":
        return math.prod(shape)
    if budget.options.size == "input":
        return math.prod(budget.model.input_size)
    layer = next(layer for layer in budget.model.layers if layer.name == budget.layer)
    return math.prod(layer.grid)


def admit_volume(
    budget: RequestBudget, index: int, shape: tuple[int, int, int], explanations: int
) -> None:
    """Charge volume ``index`` of ``shape`` (from its header) and its maps, or refuse it."""
    voxels = math.prod(shape)
    limit = budget.settings.max_volume_voxels
    budget.pixels_used += voxels
    if budget.pixels_used > limit:
        sides = "×".join(map(str, shape))
        raise PayloadTooLarge(
            f"Volume {index} is {sides} = {voxels} voxels, and the request's volumes hold "
            f"{budget.pixels_used} together; the limit is {limit}.",
            code=ErrorCode.IMAGE_TOO_LARGE,
            image=index,
            field=f"images[{index}]",
        )
    one_map = map_voxels(budget, shape)
    _check_outputs(budget, index, explanations * one_map, explanations)
    if budget.memory is None:
        return
    held = 0
    if budget.arrays:
        held += explanations * one_map * ARRAY_ANSWER_BYTES_PER_VALUE
    if budget.options.format in ("nifti", "dicom-pm"):
        # Float32 in both: gzipped at most to its size, a Parametric Map not at all.
        held += explanations * one_map * NIFTI_ANSWER_BYTES_PER_VOXEL
    if budget.options.format == "dicom-seg" or budget.reports:
        held += one_map  # a bit (a byte while it is made) per voxel, one object
    if budget.options.format in ("png", "overlay", "gray"):
        held += explanations * PICTURE_PIXELS * PICTURE_ANSWER_BYTES_PER_PIXEL
    if budget.with_image:  # the volume in 8 bits beside its maps, gzipped in base64
        held += one_map * IMAGE_ANSWER_BYTES_PER_VOXEL
    step = max(voxels * FIT_BYTES_PER_VOXEL, one_map * DRAW_BYTES_PER_VOXEL)
    budget.memory.need(budget.charge(held, step))


def _check_outputs(budget: RequestBudget, index: int, values: int, explanations: int) -> None:
    if budget.arrays:
        budget.array_used += values
        if budget.array_used > budget.settings.max_array_values:
            raise PayloadTooLarge(
                f"The 'array' heatmaps of volumes 0..{index} would hold {budget.array_used} "
                f"numbers; the limit for one request is {budget.settings.max_array_values}. "
                "Ask for heatmap.size 'input' or 'layer', or format 'nifti' (the map as a "
                "float32 .nii.gz on the same grid).",
                code=ErrorCode.ARRAY_TOO_LARGE,
                image=index,
                field="heatmap.format",
            )
    if budget.options.format in ("png", "overlay", "gray"):
        budget.output_used += explanations * PICTURE_PIXELS
        if budget.output_used > budget.settings.max_output_pixels:
            raise PayloadTooLarge(
                f"The pictures drawn for volumes 0..{index} would have {budget.output_used} "
                f"pixels; the limit for one request is {budget.settings.max_output_pixels}.",
                code=ErrorCode.OUTPUT_TOO_LARGE,
                image=index,
                field="heatmap.format",
            )
