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

import hashlib
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.contract.errors import ServiceError
from service.pipeline.engine_call import ExplainedImage
from service.pipeline.images import PreparedImage
from service.pipeline.offline import OfflinePlan, explain_prepared, plan, prepare_file
from service.trust.audit_inputs import (
    AuditInput,
    AuditUsage,
    Boxes,
    boxes_for,
    read_boxes,
    read_input,
)
from service.trust.audit_log import LOG_NAME, AuditLog, AuditSettings, read_log
from service.trust.audit_records import ImageRecord, measure
from service.trust.audit_report import write_reports

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

_CHUNK = 16  # images per engine call


@dataclass(frozen=True)
class AuditRun:
    """One audit as asked: what its records are computed with, where they go, and with
    which model and layer (None: the defaults)."""

    settings: AuditSettings
    out: Path
    model: str | None = None
    layer: str | None = None
    restart: bool = False  # start over instead of resuming
    quiet: bool = False  # no progress bar


def audit(asked: AuditRun, runtime: Runtime, items: Sequence[AuditInput]) -> int:
    """Run (or resume) the audit of ``items`` into ``asked.out``; write the reports.
    Returns the number of images that could not be explained."""
    settings = asked.settings
    chosen = plan(
        runtime.catalog().get(asked.model),
        runtime.settings,
        asked.layer,
        [settings.target] if settings.target else None,
        settings.method,
        settings.faithfulness,
    )
    boxes = read_boxes(settings.boxes) if settings.boxes else {}
    (asked.out / "thumbs").mkdir(parents=True, exist_ok=True)
    log_path = asked.out / LOG_NAME
    line = settings.line(chosen.model, chosen.layer)
    if asked.restart and log_path.exists():
        log_path.unlink()
    todo, fresh = _still_to_do(log_path, line, items, asked.out)
    started = time.monotonic()
    log = AuditLog(log_path, line, fresh)
    try:
        failures = _explain_all(chosen, runtime, todo, boxes, asked, log)
    finally:
        log.close()
    elapsed = time.monotonic() - started
    _, logged = read_log(log_path)
    latest = {r.key: r for r in logged}
    records = [latest[item.key] for item in items if item.key in latest]
    summary = write_reports(asked.out, line, records, chosen.model, settings.thresholds)
    rate = f" in {elapsed:.1f} s ({len(todo) / elapsed:.1f} images/s)" if todo and elapsed else ""
    print(f"audited {len(records)} images{rate}; {summary}")
    print(f"wrote {asked.out / 'report.html'} and {asked.out / 'report.json'}")
    return failures


def _still_to_do(
    log_path: Path, line: dict[str, Any], items: Sequence[AuditInput], out: Path
) -> tuple[list[AuditInput], bool]:
    """The items the log has no answer for, and whether the log is new."""
    previous, done = read_log(log_path)
    if previous is not None and previous != line:
        changed = sorted(k for k in line if previous.get(k) != line[k])
        raise AuditUsage(
            f"{out} holds an audit with other settings ({', '.join(changed)}); choose another "
            "--out, or --restart to start over"
        )
    # An image that failed (a file that could not be read, a server that did not answer)
    # is tried again; the last line of a key is its answer.
    finished = {r.key for r in done if r.error is None}
    if finished:
        print(f"resuming: {len(finished)} of {len(items)} images already audited", file=sys.stderr)
    return [item for item in items if item.key not in finished], previous is None


def _explain_all(
    chosen: OfflinePlan,
    runtime: Runtime,
    todo: Sequence[AuditInput],
    boxes: Boxes,
    asked: AuditRun,
    log: AuditLog,
) -> int:
    """Explain ``todo`` in chunks, each record logged as it is done; the failures."""
    from tqdm import tqdm

    failures = 0
    prepared = _prepare(todo, chosen)
    # A bar on a terminal only: in a log its carriage returns are noise.
    quiet = asked.quiet or not todo or not sys.stderr.isatty()
    with tqdm(total=len(todo), unit="image", file=sys.stderr, disable=quiet) as progress:
        while chunk := list(itertools.islice(prepared, _CHUNK)):
            ready = [(item, p) for item, p in chunk if isinstance(p, PreparedImage)]
            for item, problem in chunk:
                if isinstance(problem, str):
                    log.add(ImageRecord(key=item.key, error=problem))
                    failures += 1
            if ready:
                deadline_s = runtime.settings.request_timeout_s * len(ready)
                results = explain_prepared(runtime, chosen, [p for _, p in ready], deadline_s)
                for (item, _), result in zip(ready, results, strict=True):
                    log.add(_recorded(item, result, chosen, boxes, asked))
            progress.update(len(chunk))
    return failures


def _recorded(
    item: AuditInput,
    result: ExplainedImage,
    chosen: OfflinePlan,
    boxes: Boxes,
    asked: AuditRun,
) -> ImageRecord:
    """One image's record, its thumbnail written beside the log."""
    boxed = boxes_for(boxes, item.key, chosen.model.labels[result.targets[0]])
    record, thumbnail = measure(item.key, result, chosen.model, boxed, asked.settings.thresholds)
    record.thumbnail = f"thumbs/{_thumb_name(item.key)}"
    thumbnail.convert("RGB").save(asked.out / record.thumbnail, quality=80)
    return record


def _prepare(
    items: Sequence[AuditInput], chosen: OfflinePlan
) -> Iterator[tuple[AuditInput, PreparedImage | str]]:
    """Each item's prepared image, or what is wrong with it (a sentence about "the
    image": each item is a request of one)."""
    settings = chosen.settings
    for item in items:
        try:
            data = read_input(item, settings.max_request_bytes, settings.request_timeout_s)
            yield item, prepare_file(chosen, data, 0, keep_display=True)
        except ServiceError as error:
            yield (
                item,
                error.message.replace("Image 0", "The image").replace("image 0", "the image"),
            )
        except OSError as error:
            yield item, f"cannot read it ({error.strerror or error})"


def _thumb_name(key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    if len(safe) < 120:
        return f"{safe}.jpg"
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".jpg"
