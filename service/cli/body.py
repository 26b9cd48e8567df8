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
from service.contract.requests import parse_explain_request, target_ref
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
    parser = sub.add_parser(
        "body",
        help="print a POST /v1/explain body for image files "
        "(for curl --data-binary @file, locust, other clients)",
    )
    parser.add_argument(
        "images", nargs="+", help="image files (PNG, JPEG, DICOM, ...; - reads one from stdin)"
    )
    parser.add_argument("--model", help="model name; default: the server's default")
    parser.add_argument(
        "--target",
        action="append",
        help="class index or label to explain for "
        "every image (repeat for several); default: the top-1 class",
    )
    parser.add_argument("--method", **common.one_of(METHODS))
    parser.add_argument("--layer", help="target layer (dotted name); default: the model's")
    parser.add_argument("--format", **common.one_of(get_args(HeatmapFormat)), help="default png")
    parser.add_argument("--size", **common.one_of(get_args(HeatmapSize)), help="default original")
    parser.add_argument(
        "--encoding", **common.one_of(get_args(HeatmapEncoding)), help="default png"
    )
    parser.add_argument(
        "--report",
        **common.one_of(get_args(ReportFormat)),
        help="dicom-sr: a DICOM SR report of each DICOM image; default none",
    )
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--frame", type=int, help="frame of multi-frame images")
    parser.add_argument("-o", "--output", help="write the body here instead of stdout")


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
