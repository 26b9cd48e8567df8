"""The picture answer's rule (one image, one explanation, a picture format; ``Accept``
decides, and a named format wins a tie) and its headers (what the JSON says, in ASCII)."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import numpy as np
import pytest
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from service.contract.requests import HeatmapOptions
from service.contract.responses import ExplainResponse
from service.server.pictures import PICTURE_HEADERS, picture_response
from tests.helpers import png_bytes

PICTURE = png_bytes(np.zeros((3, 5), dtype=np.uint8))


def _prediction(index: int, label: str, score: float) -> dict[str, Any]:
    return {"index": index, "label": label, "score": score}


def _answer(images: int = 1, explanations: int = 1, fmt: str = "png") -> ExplainResponse:
    heatmap: dict[str, Any] = {"format": fmt, "width": 5, "height": 3, "raw_max": 0.25}
    if fmt in ("png", "overlay", "gray"):
        heatmap |= {"encoding": "png", "data": base64.b64encode(PICTURE).decode()}
    elif fmt == "array":
        heatmap["values"] = [[0.0] * 5] * 3
    predictions = [_prediction(2, "Pneumothorax (größer)", 0.75), _prediction(0, "nodule", 0.125)]
    result = {
        "width": 5,
        "height": 3,
        "geometry": {"resize": "stretch", "input_width": 5, "input_height": 3, "box": [0, 0, 5, 3]},
        "predictions": predictions,
        "explanations": [{"target": predictions[1], "heatmap": heatmap}] * explanations,
    }
    return ExplainResponse.model_validate(
        {
            "model": "phantom",
            "method": "gradcam",
            "layer": "features",
            "precision": "fp32",
            "results": [result] * images,
        }
    )


def _accept(header: str | None) -> MIMEAccept:
    return parse_accept_header(header, MIMEAccept)


@pytest.mark.parametrize(
    "accept,named,picture",
    [
        (None, False, False),  # no Accept, the default format: JSON as it always was
        ("*/*", False, False),
        (None, True, True),  # format=overlay named: the picture
        ("*/*", True, True),  # curl's default Accept
        ("image/png", False, True),
        ("image/*", False, True),
        ("application/json", True, False),
        ("application/json, image/png;q=0.5", True, False),
        ("image/png, application/json;q=0.5", False, True),
        ("image/png, application/json", False, False),  # a tie: the default format's JSON
        ("image/png, application/json", True, True),  # a tie: the named format's picture
        ("text/html", True, False),  # nothing on offer fits: JSON
    ],
)
def test_accept_and_a_named_format_choose(accept: str | None, named: bool, picture: bool) -> None:
    heatmap = HeatmapOptions(format="png") if named else HeatmapOptions()
    response = picture_response(heatmap, _answer(), _accept(accept))
    assert (response is not None) == picture
    if response is not None:
        assert response.mimetype == "image/png" and response.get_data() == PICTURE


@pytest.mark.parametrize(
    "images,explanations,fmt", [(2, 1, "png"), (1, 2, "overlay"), (1, 1, "array"), (1, 1, "none")]
)
def test_no_picture_but_for_one_image_one_explanation_and_a_picture_format(
    images: int, explanations: int, fmt: str
) -> None:
    heatmap = HeatmapOptions.model_validate({"format": fmt})
    answer = _answer(images, explanations, fmt)
    assert picture_response(heatmap, answer, _accept("image/png")) is None


@pytest.mark.parametrize("encoding,media_type", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_the_pictures_type_is_its_encoding(encoding: str, media_type: str) -> None:
    heatmap = HeatmapOptions.model_validate({"format": "overlay", "encoding": encoding})
    response = picture_response(heatmap, _answer(fmt="overlay"), _accept(None))
    assert response is not None and response.mimetype == media_type
    assert picture_response(heatmap, _answer(fmt="overlay"), _accept("image/png")) is None


def test_the_headers_say_what_the_json_says_in_ascii() -> None:
    answer = _answer()
    response = picture_response(HeatmapOptions(format="gray"), answer, _accept(None))
    assert response is not None
    headers = response.headers
    assert set(PICTURE_HEADERS) <= set(headers.keys())
    for name in PICTURE_HEADERS:
        assert headers[name].isascii() and headers[name].isprintable(), name
    result = answer.results[0]
    assert json.loads(headers["X-Gradcam-Predictions"]) == [
        p.model_dump() for p in result.predictions
    ]
    assert json.loads(headers["X-Gradcam-Target"]) == result.explanations[0].target.model_dump()
    assert urllib.parse.unquote(headers["X-Gradcam-Top-Class"]) == "Pneumothorax (größer)"
    assert headers["X-Gradcam-Top-Class"].startswith("Pneumothorax (gr%C3%B6")
    assert float(headers["X-Gradcam-Score"]) == 0.75
    assert headers["X-Gradcam-Top-Index"] == "2" and float(headers["X-Gradcam-Raw-Max"]) == 0.25
    assert (headers["X-Gradcam-Model"], headers["X-Gradcam-Layer"]) == ("phantom", "features")
    assert headers["X-Gradcam-Method"] == "gradcam"
