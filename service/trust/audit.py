"""``gradcam-service audit``: where a model looks, over a whole dataset, and whether that is
where the evidence is.

Every image goes through the same stages as a request (decode and fit, the batched
engine, the API's resampling to the image's own pixels), its top-1 class (or
``--target``) explained. Per image the audit keeps (``ImageRecord``):

- ``mass_in_box``: the share of the heatmap's total mass (the non-negative map at the
  image's own size, not normalised) inside the image's boxes for the explained class
  (``--boxes``), or null without boxes for it;
- ``mass_on_border``: the share in the outer 10 % frame (10 % of the width on the left
  and right, 10 % of the height at the top and bottom: 36 % of the area), where markers,
  labels and rulers sit;
- the peak (x, y) in the image's pixels, the predicted and explained class and score,
  and with ``--faithfulness`` the deletion and insertion AUCs (``docs/trust.md``).

An image is **flagged** when the mass outside its boxes exceeds ``--max-outside``
(default 0.5) or the mass on the border exceeds ``--max-border`` (default 0.5); a class
is flagged when at least ``--flag-share`` (default 25 %) of its explained images are,
and the model when any class is. An all-zero map has no shares and is not flagged.

Resumable: each finished image is one line appended to ``audit.jsonl`` in ``--out``
(after a first line with the audit's settings), its thumbnail a file in ``thumbs/``.
Run the same command again after an interruption and the images already there are
skipped; other settings into the same folder are refused (``--restart`` starts over).
``report.json`` and ``report.html`` (``audit_report.py``) are written from the log at
the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from service.contract.errors import ServiceError
from service.contract.requests import HeatmapOptions
from service.explain_files import target_ref
from service.imaging.render import normalise, resample
from service.pipeline.budgets import RequestBudget
from service.pipeline.faithfulness import auc
from service.pipeline.images import (
    ExplainedImage,
    PreparedImage,
    choose_layer,
    prepare_image,
    resolve_targets,
    run,
)
from service.pipeline.results import draw_heatmap
from service.transport.interface import ModelInfo
from service.trust.inputs import NoSuchInput, image_files

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

BORDER = 0.10  # the frame's width, as a share of each side
THUMBNAIL_SIDE = 160
LOG_NAME = "audit.jsonl"
LOG_VERSION = 1
_CHUNK = 16  # images per engine call


class AuditUsage(Exception):
    """The audit cannot run as asked (exit code 2)."""


@dataclass(frozen=True)
class Thresholds:
    max_outside: float = 0.5
    max_border: float = 0.5
    flag_share: float = 0.25
    min_score: float = 0.5


@dataclass(frozen=True)
class AuditInput:
    """One image to audit: ``key`` names it in the log, the report and the boxes file."""

    key: str
    path: Path | None = None
    dicomweb: tuple[str, str, str, str] | None = None  # (base URL, study, series, instance)


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


# --- inputs and boxes ----------------------------------------------------------------


def find_inputs(names: Sequence[str]) -> list[AuditInput]:
    """Folders (searched recursively) and files, in order (``inputs.image_files``)."""
    try:
        return [AuditInput(key, path) for key, path in image_files(names)]
    except NoSuchInput as error:
        raise AuditUsage(str(error)) from None


def read_boxes(path: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """``image,label,x0,y0,x1,y1`` rows (a header line; ``label`` empty: any class) →
    per image key, its (label, box) list. Coordinates are the image's own pixels, finite.
    Any problem with the file is an ``AuditUsage`` naming it (and the line)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return _box_rows(path, csv.DictReader(f))
    except OSError as error:
        raise AuditUsage(f"{path}: {error.strerror or type(error).__name__}") from None
    except UnicodeDecodeError as error:
        raise AuditUsage(f"{path}: not UTF-8 text (byte {error.start})") from None
    except csv.Error as error:
        raise AuditUsage(f"{path}: not a CSV file of boxes ({error})") from None


def _box_rows(path: Path, reader: csv.DictReader[str]) -> dict[str, list[tuple[str, list[float]]]]:
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    needed = {"image", "x0", "y0", "x1", "y1"}
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise AuditUsage(f"{path}: the first line must name the columns image,label,x0,y0,x1,y1")
    for row in reader:
        line = reader.line_num
        try:
            box = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
        except (TypeError, ValueError):
            raise AuditUsage(f"{path}:{line}: x0, y0, x1, y1 must be numbers") from None
        if not all(math.isfinite(value) for value in box):
            raise AuditUsage(f"{path}:{line}: x0, y0, x1, y1 must be finite numbers")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise AuditUsage(f"{path}:{line}: a box needs x1 > x0 and y1 > y0")
        boxes.setdefault(row["image"], []).append(((row.get("label") or "").strip(), box))
    return boxes


def _boxes_for(
    boxes: dict[str, list[tuple[str, list[float]]]], key: str, label: str
) -> list[list[float]]:
    rows = boxes.get(key)
    if rows is None:  # keyed by file name only
        rows = boxes.get(Path(key).name, [])
    return [box for box_label, box in rows if box_label in ("", label)]


# --- the measures --------------------------------------------------------------------


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


def _record(
    item: AuditInput,
    explained: ExplainedImage,
    model: ModelInfo,
    boxes: list[list[float]],
    thresholds: Thresholds,
) -> tuple[ImageRecord, Image.Image]:
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
        key=item.key,
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


# --- the log -------------------------------------------------------------------------


def settings_line(args: argparse.Namespace, model: ModelInfo, layer: str) -> dict[str, Any]:
    """What the log's lines were computed with: another audit may not append to it."""
    return {
        "audit": LOG_VERSION,
        "model": model.name,
        "arch": model.arch,
        "layer": layer,
        "method": args.method,
        "target": args.target,
        "faithfulness": bool(args.faithfulness),
        "boxes": str(Path(args.boxes).resolve()) if args.boxes else None,
        "thresholds": asdict(_thresholds(args)),
    }


def read_log(path: Path) -> tuple[dict[str, Any] | None, list[ImageRecord]]:
    """The settings line and the records of a log (a last line cut short by an
    interruption is dropped: its image is done again)."""
    if not path.exists():
        return None, []
    lines = path.read_bytes().splitlines()
    records: list[ImageRecord] = []
    settings: dict[str, Any] | None = None
    for number, raw in enumerate(lines):
        try:
            data = json.loads(raw)
        except ValueError:
            if number == len(lines) - 1:
                break
            raise AuditUsage(
                f"{path}: line {number + 1} is not JSON; --restart starts over"
            ) from None
        if number == 0:
            settings = data
        else:
            records.append(ImageRecord(**data))
    return settings, records


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(args.max_outside, args.max_border, args.flag_share, args.min_score)


class _Log:
    """The append-only log: one flushed line per finished image."""

    def __init__(self, path: Path, settings: dict[str, Any], fresh: bool) -> None:
        if fresh:
            path.write_text(json.dumps(settings) + "\n")
        else:
            self._trim_partial_line(path)
        self._file = path.open("a")

    @staticmethod
    def _trim_partial_line(path: Path) -> None:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def add(self, record: ImageRecord) -> None:
        self._file.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --- the run -------------------------------------------------------------------------


def _read(item: AuditInput, limit_bytes: int, timeout_s: float) -> bytes:
    if item.path is not None:
        return item.path.read_bytes()
    from service.pipeline.dicomweb import DicomWebServers, InstanceRef, fetch_instance

    assert item.dicomweb is not None
    base, study, series, instance = item.dicomweb
    return fetch_instance(
        InstanceRef(base, study, series, instance), DicomWebServers(base), 0, limit_bytes, timeout_s
    )


def _prepare(
    items: Sequence[AuditInput],
    runtime: Runtime,
    model: ModelInfo,
    layer: str,
    targets: list[int | None],
) -> Iterator[tuple[AuditInput, PreparedImage | str]]:
    settings = runtime.settings
    for item in items:
        try:
            budget = RequestBudget(settings, model, layer, HeatmapOptions(format="none"))
            data = _read(item, settings.max_request_bytes, settings.request_timeout_s)
            yield (
                item,
                prepare_image(
                    data,
                    0,
                    model,
                    partial(budget.admit_image, 0, explanations=1),
                    targets,
                    keep_display=True,
                ),
            )
        except ServiceError as error:
            yield (
                item,
                error.message.replace("Image 0", "The image").replace("image 0", "the image"),
            )
        except OSError as error:
            yield item, f"cannot read it ({error.strerror or error})"


def audit(args: argparse.Namespace, runtime: Runtime, items: Sequence[AuditInput]) -> int:
    """Run (or resume) the audit of ``items`` into ``args.out``; write the reports.
    Returns the number of images that could not be explained."""
    from service.trust.audit_report import write_reports

    model = runtime.catalog().get(args.model)
    layer = choose_layer(model, args.layer)
    targets = resolve_targets(target_ref(args.target) if args.target else None, model, 0)
    boxes = read_boxes(Path(args.boxes)) if args.boxes else {}
    thresholds = _thresholds(args)
    out = Path(args.out)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    settings = settings_line(args, model, layer)
    if args.restart and log_path.exists():
        log_path.unlink()
    previous, done = read_log(log_path)
    if previous is not None and previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise AuditUsage(
            f"{out} holds an audit with other settings ({', '.join(changed)}); choose another "
            "--out, or --restart to start over"
        )
    # An image that failed (a file that could not be read, a server that did not answer)
    # is tried again; the last line of a key is its answer.
    finished = {r.key for r in done if r.error is None}
    todo = [item for item in items if item.key not in finished]
    if finished:
        print(f"resuming: {len(finished)} of {len(items)} images already audited", file=sys.stderr)
    log = _Log(log_path, settings, fresh=previous is None)
    progress = None
    if todo:
        from tqdm import tqdm

        progress = tqdm(total=len(todo), unit="image", file=sys.stderr, disable=args.quiet)
    started = time.monotonic()
    failures = 0
    try:
        prepared = _prepare(todo, runtime, model, layer, targets)
        while True:
            chunk = [p for _, p in zip(range(_CHUNK), prepared, strict=False)]
            if not chunk:
                break
            ready = [(item, p) for item, p in chunk if isinstance(p, PreparedImage)]
            for item, problem in chunk:
                if isinstance(problem, str):
                    log.add(ImageRecord(key=item.key, error=problem))
                    failures += 1
            if ready:
                deadline = time.monotonic() + runtime.settings.request_timeout_s * len(ready)
                results = run(
                    runtime,
                    model,
                    layer,
                    args.method,
                    [p for _, p in ready],
                    deadline,
                    faithfulness=args.faithfulness,
                )
                for (item, _), result in zip(ready, results, strict=True):
                    boxed = _boxes_for(boxes, item.key, model.labels[result.targets[0]])
                    record, thumbnail = _record(item, result, model, boxed, thresholds)
                    record.thumbnail = f"thumbs/{_thumb_name(item.key)}"
                    thumbnail.convert("RGB").save(out / record.thumbnail, quality=80)
                    log.add(record)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        log.close()
        if progress is not None:
            progress.close()
    elapsed = time.monotonic() - started
    _, logged = read_log(log_path)
    latest = {r.key: r for r in logged}
    records = [latest[item.key] for item in items if item.key in latest]
    summary = write_reports(out, settings, records, model, thresholds)
    rate = f" in {elapsed:.1f} s ({len(todo) / elapsed:.1f} images/s)" if todo and elapsed else ""
    print(f"audited {len(records)} images{rate}; {summary}")
    print(f"wrote {out / 'report.html'} and {out / 'report.json'}")
    return failures


def _thumb_name(key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    if len(safe) < 120:
        return f"{safe}.jpg"
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".jpg"


def dicomweb_inputs(path: Path, timeout_s: float) -> list[AuditInput]:
    """Every instance of the studies listed in ``path`` (one ``BASE/studies/UID`` per
    line), found with QIDO-RS; keyed ``study/series/instance``."""
    from service.pipeline.dicomweb import study_instances

    found: list[AuditInput] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise AuditUsage(f"{path}: {error.strerror or type(error).__name__}") from None
    except UnicodeDecodeError as error:
        raise AuditUsage(f"{path}: not UTF-8 text (byte {error.start})") from None
    for line in lines:
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        base, _, study = url.rstrip("/").rpartition("/studies/")
        if not base or not study:
            raise AuditUsage(f"{path}: '{url}' is not BASE/studies/STUDY-UID")
        instances = study_instances(base, study, timeout_s)
        if not instances:
            raise AuditUsage(f"{url}: the server lists no instance of that study")
        for series, instance in instances:
            found.append(
                AuditInput(f"{study}/{series}/{instance}", dicomweb=(base, study, series, instance))
            )
    return found
