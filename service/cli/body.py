"""``gradcam-service body IMAGE...``: a ``POST /v1/explain`` body for image files, for
curl, load tools and other clients. Checked as a server would check it before any
work (each file is an image the service reads, by its header; the body is valid
against the request model), so a server only has its own checks left (model, labels,
sizes). No model is loaded, and nothing but the JSON is printed.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import get_args

import orjson

from service.cli import common
from service.cli.common import EXIT_OK, EXIT_USAGE, Subparsers
from service.contract.errors import ServiceError
from service.contract.request_parsing import parse_explain_request
from service.contract.requests import target_ref
from service.contract.responses import to_json
from service.contract.terms import (
    METHODS,
    HeatmapEncoding,
    HeatmapFormat,
    HeatmapSize,
    ReportFormat,
)
from service.imaging.decoding import image_format


class BodyRefused(Exception):
    """A file that cannot be read or is no image, or a value the request model refuses."""


def add_parser(sub: Subparsers) -> None:
    parser = common.add_command(
        sub,
        "body",
        "print a POST /v1/explain body for image files (for curl --data-binary @file, "
        "locust, other clients)",
        [
            "gradcam-service body examples/phantom_mass_tube.png --target tube "
            "--format overlay -o body.json",
            "gradcam-service body a.png b.png --method layercam --format array --size input",
            "gradcam-service body study.dcm --frame 0 --format dicom-sc --report dicom-sr",
        ],
        "The images go in base64, so they never go on a command line; the body is checked "
        "as a server checks it. Loads no model: the server decides what it does not set "
        "(its defaults are said below). Then: curl -s localhost:8000/v1/explain -H "
        "'Content-Type: application/json' --data-binary @body.json",
    )
    parser.add_argument(
        "images", nargs="+", help="image files (PNG, JPEG, DICOM, ...; - reads one from stdin)"
    )
    parser.add_argument("--model", help="model name; default: the server's default model")
    parser.add_argument(
        "--target",
        action="append",
        help="class index or label to explain for "
        "every image (repeat for several); default: the top-1 class",
    )
    parser.add_argument(
        "--method",
        **common.one_of(METHODS),
        help="the CAM variant (docs/correctness.md); default: gradcam",
    )
    parser.add_argument("--layer", help="target layer (dotted name); default: the model's")
    parser.add_argument(
        "--format",
        **common.one_of(get_args(HeatmapFormat)),
        help="what each heatmap is: png, the map in colour; overlay, the map over the "
        "image; gray, the map as gray levels; array, the numbers in [0, 1]; none, "
        "scores only; for DICOM images dicom-sc (a Secondary Capture of the overlay), "
        "dicom-pm (a Parametric Map) or dicom-seg (a Segmentation); default: png",
    )
    parser.add_argument(
        "--size",
        **common.one_of(get_args(HeatmapSize)),
        help="the heatmap's pixel grid: original, the image's; input, the model "
        "input's; layer, the layer's own (no upsampling); default: original",
    )
    parser.add_argument(
        "--encoding",
        **common.one_of(get_args(HeatmapEncoding)),
        help="of png, overlay and gray pictures: lossless png, or the smaller jpeg or "
        "webp; default: png",
    )
    parser.add_argument(
        "--report",
        **common.one_of(get_args(ReportFormat)),
        help="dicom-sr: a DICOM SR report of each DICOM image; default: none",
    )
    parser.add_argument("--top-k", type=int, metavar="K", help="predictions per image; default: 5")
    parser.add_argument(
        "--frame",
        type=int,
        metavar="N",
        help="frame of multi-frame images (required for multi-frame DICOM); default: "
        "each image's default",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the body here; default: stdout",
    )


def run(args: argparse.Namespace) -> int:
    """Print (or write) the body."""
    try:
        data = request_body(args)
    except BodyRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return EXIT_OK


def _read(name: str) -> bytes:
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as error:
        raise BodyRefused(f"{error.filename}: {error.strerror}") from None
    # Only the header is read: a server decodes the rest (and says what is wrong).
    if image_format(data) is None:
        raise BodyRefused(
            f"{'stdin' if name == '-' else name}: not an image the service reads "
            "(PNG, JPEG, TIFF, BMP, WebP, GIF, DICOM)"
        )
    return data


def request_body(args: argparse.Namespace) -> bytes:
    """The JSON body (one line) for ``args`` of the ``body`` command; ``BodyRefused``."""
    images = [base64.b64encode(_read(name)).decode("ascii") for name in args.images]
    heatmap = {
        key: value
        for key, value in (
            ("format", args.format),
            ("size", args.size),
            ("encoding", args.encoding),
        )
        if value
    }
    fields = {
        "model": args.model,
        "method": args.method,
        "layer": args.layer,
        "top_k": args.top_k,
        "frame": args.frame,
        "heatmap": heatmap or None,
        "report": args.report,
        "targets": [[target_ref(t) for t in args.target]] * len(images) if args.target else None,
    }
    body = {"images": images, **{k: v for k, v in fields.items() if v is not None}}
    try:
        request = parse_explain_request(orjson.dumps(body))
    except ServiceError as error:
        raise BodyRefused(error.message) from None
    return to_json(request) + b"\n"
