"""``gradcam-service body IMAGE...``: a ``POST /v1/explain`` body for image files, for
curl, load tools and other clients. Checked as a server would check it before any
work (each file is an image the service reads, by its header; the body is valid
against the request model), so a server only has its own checks left (model, labels,
sizes). No model is loaded.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import orjson

from service.contract.errors import ServiceError
from service.contract.requests import parse_explain_request
from service.contract.responses import to_json
from service.explain_files import target_ref
from service.imaging.decoding import image_format


class BodyRefused(Exception):
    """A file that cannot be read or is no image, or a value the request model refuses."""


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
