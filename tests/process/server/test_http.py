"""The HTTP API through a real gunicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from service.contract.requests import ExplainRequest
from service.contract.responses import ExplainResponse
from service.demo.evaluation import peak_in_boxes
from service.engine.runtime import Runtime
from service.imaging.values import to_uint8
from service.pipeline.explain import explain
from tests.helpers import LiveServer, as_json, encode, phantom, phantom_png, png_bytes, pydicom_file
from tests.unit.pipeline.test_explain import image_variants

TIMEOUT = 60


def _post(server: LiveServer, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/explain", json=body, timeout=TIMEOUT, **kwargs)


def _ok(server: LiveServer, body: Any) -> dict[str, Any]:
    response = _post(server, body)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    ExplainResponse.model_validate_json(response.content)
    result: dict[str, Any] = response.json()
    return result


def test_info_routes(server: LiveServer) -> None:
    assert requests.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{server.url}/readyz", timeout=5).json() == {"status": "ready"}
    models = requests.get(f"{server.url}/v1/models", timeout=5).json()["models"]
    assert [m["name"] for m in models] == ["phantom"] and models[0]["default"] is True
    detail = requests.get(f"{server.url}/v1/models/phantom", timeout=5).json()
    assert detail["labels"] == ["nodule", "mass", "opacity", "tube"]
    assert detail["input_size"] == [128, 128] and detail["channels"] == 1
    layers = requests.get(f"{server.url}/v1/models/phantom/layers", timeout=5).json()
    assert layers["default_layer"] == "features"
    assert {
        "name": "features",
        "kind": "Sequential",
        "channels": 128,
        "height": 16,
        "width": 16,
    } in layers["layers"]
    missing = requests.get(f"{server.url}/v1/models/nope/layers", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"
    # A typo: the close matches in the message and in the body, through the real server.
    typo = requests.post(
        f"{server.url}/v1/explain",
        json={"model": "phantm", "images": [encode(phantom_png(1, 40, 40))], "method": "gradcam"},
        timeout=30,
    ).json()["error"]
    assert typo["code"] == "unknown_model" and typo["suggestions"] == ["phantom"]
    assert "Did you mean 'phantom'?" in typo["message"]
    typo = requests.post(
        f"{server.url}/v1/explain", json={"images": ["aGk="], "method": "gradcm"}, timeout=30
    ).json()["error"]
    assert typo["field"] == "method" and typo["suggestions"][0] == "gradcam"


@pytest.mark.parametrize("size", ["original", "input", "layer"])
@pytest.mark.parametrize("fmt", ["array", "png", "overlay", "gray", "none"])
def test_formats_and_sizes(server: LiveServer, fmt: str, size: str) -> None:
    body = _ok(
        server,
        {"images": [encode(phantom_png(3, 210, 170))], "heatmap": {"format": fmt, "size": size}},
    )
    heatmap = body["results"][0]["explanations"][0]["heatmap"]
    expected = {"original": (210, 170), "input": (128, 128), "layer": (16, 16)}[size]
    assert (heatmap["width"], heatmap["height"]) == expected
    if fmt == "array":
        assert np.array(heatmap["values"]).shape == expected[::-1]
    elif fmt != "none":
        image = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
        assert image.size == expected and image.mode == ("L" if fmt == "gray" else "RGB")


@pytest.mark.parametrize("encoding,kind", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
@pytest.mark.parametrize("fmt", ["png", "overlay", "gray"])
def test_heatmap_encodings(server: LiveServer, fmt: str, encoding: str, kind: str) -> None:
    body = _ok(
        server,
        {
            "images": [encode(phantom_png(3, 210, 170))],
            "heatmap": {"format": fmt, "encoding": encoding},
        },
    )
    heatmap = body["results"][0]["explanations"][0]["heatmap"]
    assert heatmap["encoding"] == encoding
    image = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
    assert image.format == kind and image.size == (210, 170)


def test_http_response_equals_the_cli_output(server: LiveServer, tmp_path: Path) -> None:
    request = {
        "images": [encode(phantom_png(3, 150, 120)), encode(phantom_png(2, 90, 90))],
        "targets": [["mass", 3], None],
        "method": "xgradcam",
        "top_k": 2,
        "heatmap": {"format": "array", "size": "original"},
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    cli = subprocess.run(
        [str(Path(sys.executable).with_name("gradcam-service")), "explain", "--request", str(path)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    http = _post(server, request)
    assert http.status_code == 200
    assert json.loads(cli.stdout) == http.json()


def test_heatmap_lies_on_an_odd_sized_image(server: LiveServer) -> None:
    scene = phantom(25, 517, 389)
    body = _ok(
        server,
        {
            "images": [encode(png_bytes(to_uint8(scene.image)))],
            "targets": [["nodule", "opacity"]],
            "heatmap": {"format": "array", "size": "original"},
        },
    )
    for explanation in body["results"][0]["explanations"]:
        values = np.array(explanation["heatmap"]["values"])
        assert values.shape == (389, 517)
        assert peak_in_boxes(values, scene.boxes(explanation["target"]["label"]), 8.0)


# pydicom's own test files: (file, frame) → the heatmap must have Rows × Columns.
DICOM_FILES = [
    ("CT_small.dcm", None),  # CT, rescale slope/intercept, window
    ("MR_small.dcm", None),  # MR, 16-bit
    ("JPGExtended.dcm", None),  # JPEG extended (12-bit)
    ("SC_rgb_jpeg_dcmtk.dcm", None),  # JPEG baseline, YBR → RGB
    ("JPEG2000.dcm", None),  # JPEG 2000
    ("MR_small_jpeg_ls_lossless.dcm", None),  # JPEG-LS
    ("MR_small_RLE.dcm", None),  # RLE
    ("SC_rgb_small_odd.dcm", None),  # RGB, odd size
    ("SC_rgb_rle_2frame.dcm", 1),  # multi-frame RGB RLE, second frame
]


@pytest.mark.parametrize("name,frame", DICOM_FILES, ids=[n for n, _ in DICOM_FILES])
def test_dicom_files(server: LiveServer, name: str, frame: int | None) -> None:
    import pydicom

    path = pydicom_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body: dict[str, Any] = {
        "images": [encode(path.read_bytes())],
        "heatmap": {"format": "overlay", "size": "original"},
    }
    if frame is not None:
        body["frame"] = frame
    result = _ok(server, body)["results"][0]
    assert (result["width"], result["height"]) == (ds.Columns, ds.Rows)
    overlay = Image.open(io.BytesIO(base64.b64decode(result["explanations"][0]["heatmap"]["data"])))
    assert overlay.size == (ds.Columns, ds.Rows)


def test_every_image_format_in_one_request(server: LiveServer) -> None:
    variants = image_variants()
    body = _ok(
        server,
        {
            "images": [encode(data) for data, _ in variants.values()],
            "heatmap": {"format": "gray", "size": "original"},
        },
    )
    assert len(body["results"]) == len(variants)
    for (name, (_, size)), result in zip(variants.items(), body["results"], strict=True):
        assert (result["width"], result["height"]) == size, name
        gray = Image.open(
            io.BytesIO(base64.b64decode(result["explanations"][0]["heatmap"]["data"]))
        )
        assert gray.size == size and gray.mode == "L", name


def test_multiframe_dicom_needs_a_frame(server: LiveServer) -> None:
    data = encode(pydicom_file("SC_rgb_rle_2frame.dcm").read_bytes())
    response = _post(server, {"images": [data]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "frame_required"
    response = _post(server, {"images": [data], "frame": 2})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "frame_out_of_range"


def test_request_id_is_echoed(server: LiveServer) -> None:
    response = requests.get(f"{server.url}/healthz", headers={"X-Request-ID": "abc-123"}, timeout=5)
    assert response.headers["X-Request-ID"] == "abc-123"
    generated = requests.get(f"{server.url}/healthz", timeout=5).headers["X-Request-ID"]
    assert len(generated) == 16


def test_faithfulness_through_the_server_equals_the_in_process_answer(
    server: LiveServer, runtime: Runtime
) -> None:
    """The curves cross the engine's socket intact, and a request that asked for none
    gets none while it shares the engine with one that did."""
    asked = {
        "images": [encode(phantom_png(seed, 128, 128)) for seed in (3, 5)],
        "targets": [["nodule", "mass"], None],
        "include": ["faithfulness"],
        "heatmap": {"format": "none"},
    }
    plain = {"images": [encode(phantom_png(7, 128, 128))] * 4, "heatmap": {"format": "none"}}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: _ok(server, body), [asked, plain, asked, plain]))
    local = as_json(explain(ExplainRequest.model_validate(asked), runtime, runtime.settings))
    for answer in answers[0], answers[2]:
        for got, want in zip(answer["results"], local["results"], strict=True):
            for e, w in zip(got["explanations"], want["explanations"], strict=True):
                assert e["faithfulness"]["deletion"] == pytest.approx(
                    w["faithfulness"]["deletion"], abs=1e-4
                )
                assert e["faithfulness"]["insertion_auc"] == pytest.approx(
                    w["faithfulness"]["insertion_auc"], abs=1e-4
                )
    for answer in answers[1], answers[3]:
        assert all("faithfulness" not in e for r in answer["results"] for e in r["explanations"])
