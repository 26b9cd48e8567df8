"""``gradcam-service explain IMAGE... --out DIR``: an overlay and a heatmap PNG per input
and explained class, through the same stages as the HTTP API (decode and fit, the
engine, ``results.draw_heatmap``), so the pictures are the API's, pixel for pixel; and,
for a DICOM input, its DICOM SR report (``report: "dicom-sr"`` of the API) beside them.

What can be settled before a model loads is (``plan_files``): each input's frame, output
names that never collide, and no existing output overwritten without ``--force``. Each
file is its own request (the per-image limits apply, not a total); one bad file is one
line on stderr and the others go on.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from service.contract.errors import ServiceError
from service.contract.requests import HeatmapOptions
from service.contract.responses import ImageResult
from service.imaging.encoders import encode_png
from service.imaging.render import heatmap
from service.pipeline.budgets import RequestBudget
from service.pipeline.images import (
    ExplainedImage,
    PreparedImage,
    choose_layer,
    prepare_image,
    resolve_targets,
    run,
)
from service.pipeline.results import draw_heatmap, render_result
from service.transport.interface import ModelInfo

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

# Images per engine call: big enough to batch, small enough to show progress.
_CHUNK = 8
_PROGRESS_FROM = 5


def target_ref(text: str) -> int | str:
    """A ``--target``: a class index, or a label."""
    return int(text) if text.lstrip("-").isdigit() else text


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _stems(paths: Sequence[Path]) -> list[str]:
    """Output name stems, one per input, never shared: inputs with the same name (from
    different folders, or the same file twice) get ``-2``, ``-3``, ... in input order."""
    stems: list[str] = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in stems:
            n += 1
            stem = f"{path.stem}-{n}"
        stems.append(stem)
    return stems


class OutputExists(Exception):
    """An output file is there already and ``--force`` was not given."""


class Usage(Exception):
    """A command line that cannot be run as given (exit code 2)."""


_OUTPUT_KINDS = ("overlay", "heatmap")
# A DICOM input's report: ``<stem>.report.dcm`` (no label: one per input).
_REPORT = "report.dcm"


def _output_paths(out: Path, stem: str, labels: Sequence[str]) -> list[tuple[Path, Path]]:
    return [
        (out / f"{stem}.{_safe(label)}.overlay.png", out / f"{stem}.{_safe(label)}.heatmap.png")
        for label in labels
    ]


def _report_path(out: Path, stem: str) -> Path:
    return out / f"{stem}.{_REPORT}"


def _refuse_existing(out: Path, stems: Sequence[str]) -> None:
    """Before any work: stop if an output of these inputs is there already, whatever its
    label (the labels of top-1 targets are known only afterwards)."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        for stem in stems:
            rest = entry.name.removeprefix(stem + ".")
            label, _, kind = rest.partition(".")
            if rest != entry.name and (
                rest == _REPORT
                or (label == _safe(label) and kind in {f"{k}.png" for k in _OUTPUT_KINDS})
            ):
                raise OutputExists(f"{entry} exists (--force overwrites, or choose another --out)")


# File mode draws the two pictures the API draws for format overlay and png.
_PICTURES = (
    HeatmapOptions(format="overlay", size="original"),
    HeatmapOptions(format="png", size="original"),
)


def _write_outputs(
    result: ExplainedImage,
    answer: ImageResult,
    model: ModelInfo,
    paths: Sequence[tuple[Path, Path]],
) -> list[str]:
    written = []
    for explanation, cam, pair in zip(answer.explanations, result.cams, paths, strict=True):
        heat = heatmap(cam, result.prepared.geometry, "original")
        for options, path in zip(_PICTURES, pair, strict=True):
            path.write_bytes(encode_png(draw_heatmap(heat, result.prepared, options, model)))
        faithful = explanation.faithfulness
        written.append(
            f"{explanation.target.label} → {pair[0]}"
            + (
                f"  (deletion AUC {faithful.deletion_auc:.3f}, "
                f"insertion AUC {faithful.insertion_auc:.3f})"
                if faithful is not None
                else ""
            )
        )
    return written


@dataclass(frozen=True)
class FilePlan:
    """What file mode can settle before a model loads: each input's frame and the stem of
    its output names."""

    frames: list[int | None]
    stems: list[str]


def plan_files(args: argparse.Namespace) -> FilePlan:
    """Raises ``Usage`` or ``OutputExists``: a mistake costs no model load."""
    plan = FilePlan(
        _frames(args.frame, len(args.images)), _stems([Path(name) for name in args.images])
    )
    if not args.force:
        _refuse_existing(Path(args.out), plan.stems)
    return plan


def explain_files(args: argparse.Namespace, runtime: Runtime, plan: FilePlan) -> int:
    """Explain every planned input; the number of inputs that failed (each told on stderr)."""
    model: ModelInfo = runtime.catalog().get(args.model)
    layer = choose_layer(model, args.layer)
    targets = [target_ref(t) for t in args.target] if args.target else None
    frames, stems = plan.frames, plan.stems
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    options = HeatmapOptions(format="none", size="original")
    prepared: list[tuple[Path, str, PreparedImage]] = []
    for i, name in enumerate(args.images):
        path = Path(name)
        try:
            # Each file is its own request: the per-image limits apply, not a total.
            budget = RequestBudget(runtime.settings, model, layer, options)
            budget.check_explanations([len(targets or [None])], args.faithfulness)
            admit = partial(budget.admit_image, i, explanations=len(targets or [None]))
            prepared.append(
                (
                    path,
                    stems[i],
                    prepare_image(
                        path.read_bytes(),
                        i,
                        model,
                        admit,
                        resolve_targets(targets, model, i),
                        frame=frames[i],
                        keep_display=True,
                        keep_header=True,  # a DICOM input's report is made from it
                    ),
                )
            )
        except (OSError, ServiceError) as error:
            message = error.message if isinstance(error, ServiceError) else error.strerror
            print(f"error: {path}: {message}", file=sys.stderr)
            failures += 1
    progress = None
    if len(prepared) >= _PROGRESS_FROM:
        from tqdm import tqdm

        progress = tqdm(total=len(prepared), unit="image", file=sys.stderr)
    for start in range(0, len(prepared), _CHUNK):
        chunk = prepared[start : start + _CHUNK]
        deadline = time.monotonic() + runtime.settings.request_timeout_s
        results = run(
            runtime,
            model,
            layer,
            args.method,
            [p for _, _, p in chunk],
            deadline,
            faithfulness=args.faithfulness,
        )
        for (path, stem, _), result in zip(chunk, results, strict=True):
            answer = render_result(
                result,
                model,
                args.top_k,
                options,
                method=args.method,
                layer=layer,
                report="dicom-sr" if result.prepared.header is not None else None,
            )
            scores = ", ".join(f"{p.label} {p.score:.3f}" for p in answer.predictions)
            paths = _output_paths(out, stem, [e.target.label for e in answer.explanations])
            lines = _write_outputs(result, answer, model, paths)
            if answer.report is not None and answer.report.data is not None:
                report = _report_path(out, stem)
                report.write_bytes(base64.b64decode(answer.report.data))
                lines.append(f"report → {report}")
            elif answer.report is not None:
                lines.append(f"no report: {answer.report.reason}")
            message = f"{path}: {scores}\n" + "".join(f"  {line}\n" for line in lines)
            if progress is not None:
                progress.write(message.rstrip("\n"))
                progress.update(1)
            else:
                sys.stdout.write(message)
    if progress is not None:
        progress.close()
    return failures


def _frames(given: list[int] | None, n: int) -> list[int | None]:
    """``--frame``: none (each file's default), one for every input, or one per input."""
    if not given:
        return [None] * n
    if len(given) == 1:
        return [given[0]] * n
    if len(given) != n:
        raise Usage(
            f"--frame was given {len(given)} times for {n} inputs: give it once "
            "(every input) or once per input"
        )
    return list(given)
