"""``gradcam-service explain``: image files in, an overlay and a heatmap PNG per input and
explained class out (and, for a DICOM input, its DICOM SR report); or ``--request``, a
``POST /v1/explain`` body in and the exact JSON the HTTP API returns out.

File mode goes through the offline path (``pipeline/offline.py``: the API's stages, each
file a request of its own), and draws with ``results.draw_heatmap``, so the pictures are
the API's, pixel for pixel. What can be settled before a model loads is (``plan_files``):
each input's frame, output names that never collide, and no file overwritten
that an earlier run did not write (``outputs.py``) without ``--force``. One bad file is
one line on stderr; the others go on. A volume model's inputs (NIfTI files, DICOM
series as folders) are explained in ``explain_volumes.py``.
"""

from __future__ import annotations

import argparse
import base64
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli import common, explain_volumes, outputs, wording
from service.cli.common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, Subparsers, Usage
from service.contract.errors import ConfigError, InvalidField, ServiceError
from service.contract.request_parsing import parse_explain_request
from service.contract.requests import HeatmapOptions
from service.contract.responses import ImageResult, to_json
from service.contract.terms import METHODS
from service.imaging.encoders import encode_png
from service.imaging.render import heatmap
from service.pipeline.engine_call import ExplainedImage
from service.pipeline.explain import explain
from service.pipeline.images import PreparedImage
from service.pipeline.offline import OfflinePlan, explain_prepared, plan, prepare_file
from service.pipeline.results import RenderOptions, draw_heatmap, render_result
from service.transport.interface import ModelInfo

if TYPE_CHECKING:
    from tqdm import tqdm

    from service.engine.runtime import Runtime

# Images per engine call: big enough to batch, small enough to show progress.
_CHUNK = 8
_PROGRESS_FROM = 5
# File mode draws the two pictures the API draws for format overlay and png.
_PICTURES = (
    HeatmapOptions(format="overlay", size="original"),
    HeatmapOptions(format="png", size="original"),
)


def add_parser(sub: Subparsers) -> None:
    parser = common.add_command(
        sub,
        "explain",
        "explain image files without a server: an overlay and a heatmap PNG per image "
        "and class, the top predictions printed",
        [
            "gradcam-service explain examples/phantom_nodule.png",
            "gradcam-service explain examples/*.png --target nodule --target tube --out out",
            "gradcam-service explain scan.dcm --frame 12 --method gradcam++ --faithfulness",
            "gradcam-service explain --request examples/request.json",
            "gradcam-service explain --models models.toml --model ct3d ct.nii.gz series_dir",
        ],
        "Writes DIR/<image>.<label>.overlay.png and .heatmap.png at each image's own size "
        "(and DIR/<image>.report.dcm, a DICOM SR, for a DICOM image). A volume model takes "
        "NIfTI files and folders of one DICOM series each, and writes "
        "DIR/<volume>.<label>.heatmap.nii.gz (the map on the file's grid, with its affine) "
        "and .views.png (three slices through the map's peak). Run again, it "
        "replaces the files an earlier explain wrote; any other file of those names "
        "stops it before any work (exit code 3) unless --force. With --request, reads "
        "a POST /v1/explain body and prints exactly the JSON the HTTP API answers.",
    )
    parser.add_argument(
        "images",
        nargs="*",
        help="image files (PNG, JPEG, TIFF, BMP, WebP, GIF, DICOM); for a volume model, "
        "NIfTI files (.nii, .nii.gz) or folders each holding one DICOM series",
    )
    parser.add_argument(
        "--request",
        metavar="BODY",
        help="a POST /v1/explain body (a file, or - for stdin) to answer instead of image "
        "files: prints the JSON response; default: none",
    )
    common.add_model_options(parser)
    parser.add_argument("--layer", help="target layer (dotted name); default: the model's")
    parser.add_argument(
        "--method",
        **common.one_of(METHODS),
        default="gradcam",
        help="the CAM variant that weighs the layer's channels (docs/correctness.md)",
    )
    parser.add_argument(
        "--target",
        action="append",
        help="class index or label to explain (repeat for several); default: the top-1 class",
    )
    parser.add_argument(
        "--top-k", type=int, default=5, metavar="K", help="predictions to print per image"
    )
    parser.add_argument(
        "--faithfulness",
        action="store_true",
        help="print each explanation's deletion and insertion AUCs (docs/trust.md; "
        "39 more forward passes each)",
    )
    parser.add_argument("--out", default="gradcam-out", metavar="DIR", help="folder for the files")
    parser.add_argument(
        "--frame",
        type=int,
        action="append",
        metavar="N",
        help="frame of multi-frame images (DICOM): once for every input, or "
        "repeated once per input; default: each file's own default",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite files of the output names that an earlier explain did not write "
        "(without it: stop, exit code 3)",
    )


def run(args: argparse.Namespace) -> int:
    if bool(args.request) == bool(args.images):
        raise Usage("explain takes image files or --request, not both and not neither")
    files: FilePlan | None = plan_files(args) if args.images else None
    if files is not None:
        common.model_name(args)  # an unknown --model costs no model load
    try:
        runtime = common.runtime(args)
    except ConfigError as error:
        return common.told(error)
    try:
        if files is None:
            return _answer_request(args, runtime)
        return EXIT_INPUT if explain_files(args, runtime, files) else EXIT_OK
    except OSError as error:
        return common.told(error)
    except ServiceError as error:
        # Not one input's: the --layer or --target given (each input's errors are caught
        # where it is explained), so nothing was done.
        print(f"error: {wording.about_command(error)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        runtime.close()


def _answer_request(args: argparse.Namespace, runtime: Runtime) -> int:
    body = Path(args.request).read_bytes() if args.request != "-" else sys.stdin.buffer.read()
    try:
        response = explain(parse_explain_request(body), runtime, runtime.settings)
    except ServiceError as error:
        sys.stdout.buffer.write(to_json(error.to_response()) + b"\n")
        return 1
    sys.stdout.buffer.write(to_json(response) + b"\n")
    return 0


# --- what is settled before a model loads ---------------------------------------------


@dataclass(frozen=True)
class FilePlan:
    """Each input's frame and the stem of its output names."""

    frames: list[int | None]
    stems: list[str]


def plan_files(args: argparse.Namespace) -> FilePlan:
    """Raises ``Usage`` or ``OutputExists``: a mistake costs no model load."""
    files = FilePlan(
        _frames(args.frame, len(args.images)), outputs.stems([Path(name) for name in args.images])
    )
    if not args.force:
        outputs.refuse_existing(Path(args.out), files.stems)
    return files


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


# --- the files, through the offline path -----------------------------------------------


def explain_files(args: argparse.Namespace, runtime: Runtime, files: FilePlan) -> int:
    """Explain every planned input; the number of inputs that failed (each told on stderr)."""
    chosen = plan(
        runtime.catalog().get(args.model),
        runtime.settings,
        args.layer,
        args.target,
        args.method,
        args.faithfulness,
    )
    if chosen.model.is_volume:
        explain_volumes.refuse_image_options(args, chosen)
        return explain_volumes.explain_volumes(args, runtime, chosen, files.stems)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    prepared: list[tuple[Path, str, PreparedImage]] = []
    for i, name in enumerate(args.images):
        path = Path(name)
        try:
            # A DICOM input's report is made from its header.
            data = _image_bytes(path, chosen)
            image = prepare_file(
                chosen, data, i, files.frames[i], keep_display=True, keep_header=True
            )
        except (OSError, ServiceError) as error:
            print(f"error: {wording.about_file(path, error)}", file=sys.stderr)
            failures += 1
            continue
        prepared.append((path, files.stems[i], image))
    progress = _progress(len(prepared))
    for start in range(0, len(prepared), _CHUNK):
        chunk = prepared[start : start + _CHUNK]
        results = explain_prepared(
            runtime, chosen, [p for _, _, p in chunk], runtime.settings.request_timeout_s
        )
        for (path, stem, _), result in zip(chunk, results, strict=True):
            message = f"{path}: " + _write_outputs(result, chosen, args.top_k, out, stem)
            if progress is not None:
                progress.write(message.rstrip("\n"))
                progress.update(1)
            else:
                sys.stdout.write(message)
    if progress is not None:
        progress.close()
    return failures


def _image_bytes(path: Path, chosen: OfflinePlan) -> bytes:
    """A file's bytes; a folder (a DICOM series, for a volume model) is said to be one."""
    if path.is_dir():
        raise InvalidField(
            f"Image 0 is a folder: a folder is read as one DICOM series (a volume), and model "
            f"'{chosen.model.name}' explains 2-D images. Give its files, or a volume model."
        )
    return path.read_bytes()


def _progress(total: int) -> tqdm[None] | None:
    """A bar on a terminal only: in a log, its carriage returns are noise, and each
    image's lines on stdout already tell how far the command is."""
    if total < _PROGRESS_FROM or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="image", file=sys.stderr)


def _write_outputs(
    result: ExplainedImage, chosen: OfflinePlan, top_k: int, out: Path, stem: str
) -> str:
    """Write one input's pictures (and report); what to print about them."""
    answer = render_result(
        result,
        chosen.model,
        RenderOptions(
            heatmap=HeatmapOptions(format="none", size="original"),
            top_k=top_k,
            method=chosen.how.method,
            layer=chosen.layer,
            report="dicom-sr" if result.prepared.source is not None else None,
        ),
    )
    scores = ", ".join(f"{p.label} {p.score:.3f}" for p in answer.predictions)
    lines = _write_pictures(result, answer, chosen.model, out, stem)
    if answer.out_of_domain is not None:
        lines.insert(0, f"out of domain: {answer.out_of_domain}")
    if chosen.model.random_weights:
        lines.insert(0, "random weights: the models file gives none, these scores mean nothing")
    if answer.report is not None and answer.report.data is not None:
        report = out / f"{stem}.{outputs.REPORT}"
        report.write_bytes(base64.b64decode(answer.report.data))
        lines.append(f"report → {report}")
    elif answer.report is not None:
        lines.append(f"no report: {answer.report.reason}")
    return f"{scores}\n" + "".join(f"  {line}\n" for line in lines)


def _write_pictures(
    result: ExplainedImage, answer: ImageResult, model: ModelInfo, out: Path, stem: str
) -> list[str]:
    written = []
    for explanation, cam in zip(answer.explanations, result.cams, strict=True):
        label = outputs.safe(explanation.target.label)
        paths = (out / f"{stem}.{label}.overlay.png", out / f"{stem}.{label}.heatmap.png")
        heat = heatmap(cam, result.prepared.geometry, "original")
        for options, path in zip(_PICTURES, paths, strict=True):
            picture = encode_png(draw_heatmap(heat, result.prepared, options, model))
            path.write_bytes(outputs.marked_png(picture))
        faithful = explanation.faithfulness
        written.append(
            f"{explanation.target.label} → {paths[0]}"
            + (
                f"  (deletion AUC {faithful.deletion_auc:.3f}, "
                f"insertion AUC {faithful.insertion_auc:.3f})"
                if faithful is not None
                else ""
            )
        )
    return written
