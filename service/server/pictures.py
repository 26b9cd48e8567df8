"""The answer as the picture itself, for the image doors (``image_doors.py``).

A client that sent an image file may want a picture file back, not JSON to unpack. The
rule, in two steps:

1. A picture is on offer when the request came through an image door (a raw image body
   or a form), has one image and one explanation, and its heatmap format is ``png``,
   ``overlay`` or ``gray``. Its type is the heatmap's encoding: ``image/png`` (the
   default), ``image/jpeg`` or ``image/webp``. A volume's ``nifti`` map is on offer the
   same way, as the file itself (``application/gzip``, a ``.nii.gz``).
2. ``Accept`` chooses between that picture and JSON, as HTTP's content negotiation does;
   where it leaves them equal (``*/*``, curl's, or no ``Accept``) the format decides: a
   format the request named (``format=overlay``) gets the picture, the default gets JSON.
   So ``Accept: image/png`` gets the picture, ``Accept: application/json`` gets JSON.

Anything else is JSON, as it always was; errors are always JSON. A picture answer carries
what the JSON would have said beside it in headers (``PICTURE_HEADERS``), ASCII only:
JSON with ``\\u`` escapes, and a label percent-encoded (UTF-8) where it is not plain
ASCII.
"""

from __future__ import annotations

import base64
import json
import string
import urllib.parse

from flask import Response
from werkzeug.datastructures import MIMEAccept

from service.contract.requests import HeatmapOptions
from service.contract.responses import ExplainResponse, Explanation, ImageResult, Prediction

PICTURE_FORMATS = ("png", "overlay", "gray", "nifti")
_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# A volume's map as a file: the .nii.gz itself.
NIFTI_TYPE = "application/gzip"
JSON_TYPE = "application/json"
PICTURE_HEADERS = (
    "X-Gradcam-Model",
    "X-Gradcam-Method",
    "X-Gradcam-Layer",
    "X-Gradcam-Top-Class",
    "X-Gradcam-Top-Index",
    "X-Gradcam-Score",
    "X-Gradcam-Target",
    "X-Gradcam-Raw-Max",
    "X-Gradcam-Predictions",
)
# On every answer (JSON or picture) of a model without weights, for clients that read
# only pictures or only headers; exposed to listed CORS origins with the others.
RANDOM_WEIGHTS_HEADER = "X-Gradcam-Random-Weights"
# Printable ASCII stays as it is in a header; the rest (and "%") is percent-encoded.
_PLAIN = string.punctuation.replace("%", "") + " "


def picture_response(
    heatmap: HeatmapOptions, answer: ExplainResponse, accept: MIMEAccept
) -> Response | None:
    """The picture answer to an image door's request, or None where the answer is JSON."""
    media_type = _on_offer(heatmap, answer)
    if media_type is None:
        return None
    named = "format" in heatmap.model_fields_set
    offers = [media_type, JSON_TYPE] if named else [JSON_TYPE, media_type]
    chosen = accept.best_match(offers) if accept else offers[0]
    if chosen != media_type:
        return None
    result = answer.results[0]
    explanation = result.explanations[0]
    assert isinstance(explanation.heatmap.data, str)  # _on_offer saw it
    response = Response(base64.b64decode(explanation.heatmap.data), mimetype=media_type)
    response.headers.update(score_headers(answer, result, explanation))
    return response


def _on_offer(heatmap: HeatmapOptions, answer: ExplainResponse) -> str | None:
    """The picture's media type, where the answer can be one picture."""
    if heatmap.format not in PICTURE_FORMATS or len(answer.results) != 1:
        return None
    explanations = answer.results[0].explanations
    if len(explanations) != 1 or not isinstance(explanations[0].heatmap.data, str):
        return None
    return NIFTI_TYPE if heatmap.format == "nifti" else _MEDIA_TYPES[heatmap.encoding]


def score_headers(
    answer: ExplainResponse, result: ImageResult, explanation: Explanation
) -> dict[str, str]:
    """What the JSON answer says of the picture, as headers."""
    top = result.predictions[0]
    return {
        "X-Gradcam-Model": _plain(answer.model),
        "X-Gradcam-Method": answer.method,
        "X-Gradcam-Layer": _plain(answer.layer),
        "X-Gradcam-Top-Class": _plain(top.label),
        "X-Gradcam-Top-Index": str(top.index),
        "X-Gradcam-Score": repr(top.score),
        "X-Gradcam-Target": _compact(explanation.target),
        "X-Gradcam-Raw-Max": repr(explanation.heatmap.raw_max),
        "X-Gradcam-Predictions": _compact(result.predictions),
    }


def _plain(text: str) -> str:
    return urllib.parse.quote(text, safe=_PLAIN)


def _compact(value: Prediction | list[Prediction]) -> str:
    """Predictions as compact JSON in ASCII (``ensure_ascii``: a header is Latin-1 at best)."""
    data = [p.model_dump() for p in value] if isinstance(value, list) else value.model_dump()
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)
