"""The HTTP API through a real gunicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file

from service.demo.metrics import peak_in_boxes
from service.demo.phantom import to_uint8
from service.schemas import ErrorResponse, ExplainResponse
from tests.conftest import LiveServer, bomb_png, encode, phantom, phantom_png, png_bytes
from tests.test_explain import image_variants

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
    assert {"name": "features", "kind": "Sequential", "channels": 128, "height": 16,
            "width": 16} in layers["layers"]
    missing = requests.get(f"{server.url}/v1/models/nope/layers", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"


@pytest.mark.parametrize("size", ["original", "input", "layer"])
@pytest.mark.parametrize("fmt", ["array", "png", "overlay", "gray", "none"])
def test_formats_and_sizes(server: LiveServer, fmt: str, size: str) -> None:
    body = _ok(server, {"images": [encode(phantom_png(3, 210, 170))],
                        "heatmap": {"format": fmt, "size": size}})
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
    body = _ok(server, {"images": [encode(phantom_png(3, 210, 170))],
                        "heatmap": {"format": fmt, "encoding": encoding}})
    heatmap = body["results"][0]["explanations"][0]["heatmap"]
    assert heatmap["encoding"] == encoding
    image = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
    assert image.format == kind and image.size == (210, 170)


def test_http_response_equals_the_cli_output(server: LiveServer, tmp_path: Path) -> None:
    request = {"images": [encode(phantom_png(3, 150, 120)), encode(phantom_png(2, 90, 90))],
               "targets": [["mass", 3], None], "method": "xgradcam", "top_k": 2,
               "heatmap": {"format": "array", "size": "original"}}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    cli = subprocess.run([str(Path(sys.executable).with_name("gradcam-service")), "explain",
                          "--request", str(path)], capture_output=True, timeout=120, check=True)
    http = _post(server, request)
    assert http.status_code == 200
    assert json.loads(cli.stdout) == http.json()


def test_heatmap_lies_on_an_odd_sized_image(server: LiveServer) -> None:
    scene = phantom(25, 517, 389)
    body = _ok(server, {"images": [encode(png_bytes(to_uint8(scene.image)))],
                        "targets": [["nodule", "opacity"]],
                        "heatmap": {"format": "array", "size": "original"}})
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

    path = get_testdata_file(name)
    assert path is not None, f"pydicom ships {name}"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body = {"images": [encode(Path(path).read_bytes())],
            "heatmap": {"format": "overlay", "size": "original"}}
    if frame is not None:
        body["frame"] = frame
    result = _ok(server, body)["results"][0]
    assert (result["width"], result["height"]) == (ds.Columns, ds.Rows)
    overlay = Image.open(io.BytesIO(base64.b64decode(
        result["explanations"][0]["heatmap"]["data"])))
    assert overlay.size == (ds.Columns, ds.Rows)


def test_every_image_format_in_one_request(server: LiveServer) -> None:
    variants = image_variants()
    body = _ok(server, {"images": [encode(data) for data, _ in variants.values()],
                        "heatmap": {"format": "gray", "size": "original"}})
    assert len(body["results"]) == len(variants)
    for (name, (_, size)), result in zip(variants.items(), body["results"], strict=True):
        assert (result["width"], result["height"]) == size, name
        gray = Image.open(io.BytesIO(base64.b64decode(
            result["explanations"][0]["heatmap"]["data"])))
        assert gray.size == size and gray.mode == "L", name


def test_multiframe_dicom_needs_a_frame(server: LiveServer) -> None:
    data = encode(Path(get_testdata_file("SC_rgb_rle_2frame.dcm")).read_bytes())
    response = _post(server, {"images": [data]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "frame_required"
    response = _post(server, {"images": [data], "frame": 2})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "frame_out_of_range"


GOOD = encode(phantom_png(2, 64, 64))
PNG = phantom_png(1, 64, 64)

# (name, method, path, body as JSON or raw bytes, headers, status, error code)
BAD: list[tuple[str, str, str, Any, dict[str, str], int, str]] = [
    ("not json", "POST", "/v1/explain", b"{images: nope", {}, 400, "invalid_json"),
    ("empty body", "POST", "/v1/explain", b"", {}, 400, "invalid_json"),
    ("json array", "POST", "/v1/explain", [GOOD], {}, 422, "invalid_body"),
    ("missing images", "POST", "/v1/explain", {"top_k": 2}, {}, 422, "invalid_field"),
    ("images not a list", "POST", "/v1/explain", {"images": GOOD}, {}, 422, "invalid_field"),
    ("no images", "POST", "/v1/explain", {"images": []}, {}, 422, "invalid_field"),
    ("image not a string", "POST", "/v1/explain", {"images": [42]}, {}, 422, "invalid_field"),
    ("top_k a string", "POST", "/v1/explain", {"images": [GOOD], "top_k": "3"}, {}, 422,
     "invalid_field"),
    ("top_k zero", "POST", "/v1/explain", {"images": [GOOD], "top_k": 0}, {}, 422,
     "invalid_field"),
    ("unknown field", "POST", "/v1/explain", {"images": [GOOD], "colour": 1}, {}, 422,
     "invalid_field"),
    ("unknown method", "POST", "/v1/explain", {"images": [GOOD], "method": "scorecam"}, {}, 422,
     "invalid_field"),
    ("unknown format", "POST", "/v1/explain",
     {"images": [GOOD], "heatmap": {"format": "jpeg"}}, {}, 422, "invalid_field"),
    ("unknown encoding", "POST", "/v1/explain",
     {"images": [GOOD], "heatmap": {"encoding": "gif"}}, {}, 422, "invalid_field"),
    ("encoding of an array", "POST", "/v1/explain",
     {"images": [GOOD], "heatmap": {"format": "array", "encoding": "jpeg"}}, {}, 422,
     "invalid_field"),
    ("not base64", "POST", "/v1/explain", {"images": ["%%%% not base64"]}, {}, 422,
     "invalid_base64"),
    ("zero bytes", "POST", "/v1/explain", {"images": [""]}, {}, 422, "empty_image"),
    ("text file", "POST", "/v1/explain", {"images": [encode(b"just some text\n" * 20)]}, {},
     415, "unsupported_image"),
    ("truncated png", "POST", "/v1/explain", {"images": [encode(PNG[: len(PNG) // 2])]}, {},
     422, "invalid_image"),
    ("header-only png", "POST", "/v1/explain", {"images": [encode(PNG[:33])]}, {}, 422,
     "invalid_image"),
    ("bomb header", "POST", "/v1/explain", {"images": [encode(bomb_png(60_000, 60_000))]}, {},
     413, "image_too_large"),
    ("too many images", "POST", "/v1/explain", {"images": [GOOD] * 33}, {}, 413,
     "too_many_images"),
    ("unknown model", "POST", "/v1/explain", {"images": [GOOD], "model": "resnet"}, {}, 404,
     "unknown_model"),
    ("unknown layer", "POST", "/v1/explain", {"images": [GOOD], "layer": "layer4"}, {}, 422,
     "unknown_layer"),
    ("unknown label", "POST", "/v1/explain", {"images": [GOOD], "targets": ["cat"]}, {}, 422,
     "unknown_label"),
    ("target out of range", "POST", "/v1/explain", {"images": [GOOD], "targets": [7]}, {}, 422,
     "target_out_of_range"),
    ("negative target", "POST", "/v1/explain", {"images": [GOOD], "targets": [[-1]]}, {}, 422,
     "target_out_of_range"),
    ("targets wrong length", "POST", "/v1/explain",
     {"images": [GOOD], "targets": [None, None]}, {}, 422, "targets_length"),
    ("frame of a png", "POST", "/v1/explain", {"images": [GOOD], "frame": -1}, {}, 422,
     "invalid_field"),
    ("wrong content type", "POST", "/v1/explain", b'{"images": []}',
     {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("wrong method", "GET", "/v1/explain", None, {}, 405, "method_not_allowed"),
    ("unknown route", "GET", "/v2/explain", None, {}, 404, "not_found"),
    ("unknown model info", "GET", "/v1/models/nope", None, {}, 404, "unknown_model"),
    ("body too large", "POST", "/v1/explain", {"images": ["A" * (9 * 2**20)]}, {}, 413,
     "request_too_large"),
]


def _send(server: LiveServer, method: str, path: str, body: Any,
          headers: dict[str, str]) -> requests.Response:
    if isinstance(body, bytes):
        data = body
        headers = {"Content-Type": "application/json", **headers}
    elif body is None:
        data = None
    else:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **headers}
    return requests.request(method, f"{server.url}{path}", data=data, headers=headers,
                            timeout=TIMEOUT)


def test_bad_input_catalogue(server: LiveServer) -> None:
    before = _ok(server, {"images": [GOOD], "heatmap": {"format": "array", "size": "layer"}})
    assert len(BAD) >= 25
    for name, method, path, body, headers, status, code in BAD:
        response = _send(server, method, path, body, headers)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.headers["Content-Type"] == "application/json", name
        error = ErrorResponse.model_validate_json(response.content).error
        assert error.code == code, (name, error)
        assert error.message and error.message[0].isupper(), (name, error.message)
    # The server is still up and still gives the same answer.
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    after = _ok(server, {"images": [GOOD], "heatmap": {"format": "array", "size": "layer"}})
    assert after == before
    assert "Traceback" not in server.read_log()


def test_request_id_is_echoed(server: LiveServer) -> None:
    response = requests.get(f"{server.url}/healthz", headers={"X-Request-ID": "abc-123"},
                            timeout=5)
    assert response.headers["X-Request-ID"] == "abc-123"
    generated = requests.get(f"{server.url}/healthz", timeout=5).headers["X-Request-ID"]
    assert len(generated) == 16
