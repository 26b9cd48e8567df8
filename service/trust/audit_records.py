"""What an audit keeps of each image (``ImageRecord``: its line in the log, its row in the
report) and how it is measured and judged: the shares of the heatmap's mass in the
image's boxes, near them and on the border (``shares``), and the thresholds that flag
it (``judge``). The definitions are ``audit.py``'s module text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.contract.requests import HeatmapOptions
from service.imaging.render import normalise, resample
from service.pipeline.engine_call import ExplainedImage
from service.pipeline.faithfulness import auc
from service.pipeline.results import draw_heatmap
from service.transport.interface import ModelInfo

BORDER = 0.10  # the frame's width, as a share of each side
THUMBNAIL_SIDE = 160


@dataclass(frozen=True)
class Thresholds:
    max_outside: float = 0.5
    max_border: float = 0.5
    flag_share: float = 0.25
    min_score: float = 0.5


@dataclass
class ImageRecord:
    """One image's line in the log (and row in the report)."""

    key: str
    error: str | None = None
    width: int = 0
    height: int = 0
    predicted: str = ""
    predicted_score: float = 0.0
    explained: str = ""
    explained_score: float = 0.0
    mass_in_box: float | None = None
    mass_near_box: float | None = None
    mass_on_border: float | None = None
    peak: list[int] | None = None
    boxes: list[list[float]] = field(default_factory=list)
    judged: bool = False
    flagged: bool = False
    why: list[str] = field(default_factory=list)
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    map: list[list[float]] = field(default_factory=list)  # normalised, layer resolution
    thumbnail: str = ""  # relative to the audit folder


@dataclass(frozen=True)
class Shares:
    """Shares of a heatmap's mass (None: no boxes for it, or an all-zero map)."""

    in_box: float | None
    near_box: float | None
    on_border: float | None


def _inside(
    shape: tuple[int, ...], boxes: Sequence[Sequence[float]], grow: tuple[float, float]
) -> np.ndarray:
    """Pixels whose centres lie in a box grown by ``grow`` (x, y) on each side (pixel
    ``x`` spans [x, x + 1))."""
    inside = np.zeros(shape, dtype=bool)
    gx, gy = grow
    for x0, y0, x1, y1 in boxes:
        xs = slice(max(0, int(np.ceil(x0 - gx - 0.5))), max(0, int(np.ceil(x1 + gx - 0.5))))
        ys = slice(max(0, int(np.ceil(y0 - gy - 0.5))), max(0, int(np.ceil(y1 + gy - 0.5))))
        inside[ys, xs] = True
    return inside


def shares(
    heat: np.ndarray, boxes: Sequence[Sequence[float]], cell: tuple[float, float] = (0.0, 0.0)
) -> Shares:
    """The shares of a non-negative ``(H, W)`` map's mass: in the boxes, in the boxes grown
    by one layer ``cell`` (x, y in the map's pixels) on each side, and on the border."""
    total = float(heat.sum(dtype=np.float64))
    if total <= 0:
        return Shares(None, None, None)
    height, width = heat.shape
    in_box = near_box = None
    if boxes:
        in_box = float(heat[_inside(heat.shape, boxes, (0.0, 0.0))].sum(dtype=np.float64)) / total
        near = _inside(heat.shape, boxes, cell)
        near_box = float(heat[near].sum(dtype=np.float64)) / total
    bx, by = round(BORDER * width), round(BORDER * height)
    interior = float(heat[by : height - by, bx : width - bx].sum(dtype=np.float64))
    return Shares(in_box, near_box, 1.0 - interior / total)


def judge(record: ImageRecord, thresholds: Thresholds) -> None:
    """Set ``judged``, ``flagged`` and ``why`` (module text)."""
    record.judged = (
        record.explained_score >= thresholds.min_score and record.mass_on_border is not None
    )
    why = []
    if record.judged:
        if record.mass_near_box is not None:
            outside = 1 - record.mass_near_box
            if outside > thresholds.max_outside:
                why.append(f"{outside:.0%} of the mass away from the boxes")
        elif record.mass_on_border is not None and record.mass_on_border > thresholds.max_border:
            why.append(f"{record.mass_on_border:.0%} of the mass on the border")
    record.flagged, record.why = bool(why), why


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def measure(
    key: str,
    explained: ExplainedImage,
    model: ModelInfo,
    boxes: list[list[float]],
    thresholds: Thresholds,
) -> tuple[ImageRecord, Image.Image]:
    """One explained image's record, judged, and its thumbnail (the overlay, small)."""
    prepared = explained.prepared
    geometry = prepared.geometry
    predicted = int(explained.order[0])
    target = explained.targets[0]
    cam = explained.cams[0]
    heat = resample(cam, geometry, "original")
    # One cell of the layer, in the image's pixels: the blur of a perfect map.
    cell = (
        geometry.input_width / cam.shape[1] / geometry.scale_x,
        geometry.input_height / cam.shape[0] / geometry.scale_y,
    )
    measured = shares(heat, boxes, cell)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    record = ImageRecord(
        key=key,
        width=geometry.width,
        height=geometry.height,
        predicted=model.labels[predicted],
        predicted_score=round(float(explained.scores[predicted]), 6),
        explained=model.labels[target],
        explained_score=round(float(explained.scores[target]), 6),
        mass_in_box=_rounded(measured.in_box),
        mass_near_box=_rounded(measured.near_box),
        mass_on_border=_rounded(measured.on_border),
        peak=[int(x), int(y)],
        boxes=boxes,
        map=np.round(normalise(cam), 4).tolist(),
    )
    if explained.curves:
        deletion, insertion = explained.curves[0]
        record.deletion_auc = round(auc(deletion), 6)
        record.insertion_auc = round(auc(insertion), 6)
    judge(record, thresholds)
    overlay = draw_heatmap(
        normalise(heat), prepared, HeatmapOptions(format="overlay", size="original"), model
    )
    thumbnail = Image.fromarray(overlay)
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    return record, thumbnail
