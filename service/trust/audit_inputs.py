"""What an audit reads: the images (files, or the instances of DICOMweb studies), each
named by a key, and the boxes file of where each image's evidence lies. Every problem
with them is an ``AuditUsage`` that names the file (and the line), before a model
loads."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.trust.inputs import NoSuchInput, image_files

# The image key -> its (label, box) rows; an empty label: any class.
Boxes = dict[str, list[tuple[str, list[float]]]]


class AuditUsage(Exception):
    """The audit cannot run as asked (exit code 2)."""


@dataclass(frozen=True)
class AuditInput:
    """One image to audit: ``key`` names it in the log, the report and the boxes file."""

    key: str
    path: Path | None = None
    dicomweb: tuple[str, str, str, str] | None = None  # (base URL, study, series, instance)


def find_inputs(names: Sequence[str]) -> list[AuditInput]:
    """Folders (searched recursively) and files, in order (``inputs.image_files``)."""
    try:
        return [AuditInput(key, path) for key, path in image_files(names)]
    except NoSuchInput as error:
        raise AuditUsage(str(error)) from None


def read_boxes(path: Path) -> Boxes:
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


def _box_rows(path: Path, reader: csv.DictReader[str]) -> Boxes:
    boxes: Boxes = {}
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


def boxes_for(boxes: Boxes, key: str, label: str) -> list[list[float]]:
    rows = boxes.get(key)
    if rows is None:  # keyed by file name only
        rows = boxes.get(Path(key).name, [])
    return [box for box_label, box in rows if box_label in ("", label)]


def read_input(item: AuditInput, limit_bytes: int, timeout_s: float) -> bytes:
    if item.path is not None:
        return item.path.read_bytes()
    from service.pipeline.dicomweb import DicomWebServers, InstanceRef, fetch_instance

    assert item.dicomweb is not None
    base, study, series, instance = item.dicomweb
    return fetch_instance(
        InstanceRef(base, study, series, instance), DicomWebServers(base), 0, limit_bytes, timeout_s
    )


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
