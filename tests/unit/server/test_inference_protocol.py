"""The Open Inference Protocol door (``/v2``): metadata, JSON and binary tensors, errors
in the protocol's shape, and results equal to ``/v1`` for the same image.

In-process, with Flask's client on the demo model's runtime; the real server, driven by
Triton's and KServe's own clients, in ``tests/process/server/test_inference_protocol.py``.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from flask.testing import FlaskClient
from PIL import Image
from pydantic import SecretStr

from service.contract.binary_tensors import pack_bytes, unpack_bytes
from service.contract.errors import BadRequest
from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.server.app import create_app
from tests.helpers import REPO, encode, json_of, phantom_png

MODEL = "phantom"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> FlaskClient:
    return create_app(
        Settings(device="cpu", max_images_per_request=4), engine=runtime
    ).test_client()


def _image_input(*images: bytes) -> dict[str, Any]:
    return {
        "name": "image",
        "shape": [len(images)],
        "datatype": "BYTES",
        "data": [encode(i) for i in images],
    }


def _outputs(answer: dict[str, Any]) -> dict[str, np.ndarray | list[Any]]:
    found: dict[str, np.ndarray | list[Any]] = {}
    for output in answer["outputs"]:
        if output["datatype"] == "BYTES":
            found[output["name"]] = output["data"]
        else:
            dtype = np.float32 if output["datatype"] == "FP32" else np.int64
            found[output["name"]] = np.asarray(output["data"], dtype=dtype).reshape(output["shape"])
    return found


def _v1(client: FlaskClient, image: bytes, size: str = "input") -> dict[str, Any]:
    answer = client.post(
        "/v1/explain",
        json={"images": [encode(image)], "top_k": 4, "heatmap": {"format": "array", "size": size}},
    )
    assert answer.status_code == 200, answer.json
    result: dict[str, Any] = json_of(answer)["results"][0]
    return result


def _assert_protocol_error(answer: Any, status: int, *words: str) -> None:
    assert answer.status_code == status, answer.json
    assert set(answer.json) == {"error"}, answer.json
    for word in words:
        assert word in json_of(answer)["error"], answer.json


# --- metadata and health -----------------------------------------------------------


def test_the_server_and_each_model_describe_themselves(
    client: FlaskClient, runtime: Runtime
) -> None:
    server = json_of(client.get("/v2"))
    assert server["name"] == "gradcam-service" and "binary_tensor_data" in server["extensions"]
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").json == {"ready": True}
    assert client.get(f"/v2/models/{MODEL}/ready").json == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
    metadata = json_of(client.get(f"/v2/models/{MODEL}"))
    assert metadata["versions"] == ["1"]
    assert {t["name"]: t["datatype"] for t in metadata["inputs"]} == {
        "image": "BYTES",
        "target": "INT64",
    }
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, 4])
    assert outputs["heatmap"] == ("FP32", [-1, -1, -1])
    assert outputs["heatmap_png"][0] == outputs["labels"][0] == "BYTES"
    parameters = metadata["parameters"]
    assert (
        "gradcam++" in parameters["methods"] and parameters["default_layer"] in parameters["layers"]
    )
    assert parameters["labels"] == list(runtime.catalog().get(MODEL).labels)
    config = json_of(client.get(f"/v2/models/{MODEL}/config"))
    assert config["max_batch_size"] == 0
    assert config["input"][0] == {
        "name": "image",
        "data_type": "TYPE_STRING",
        "dims": [-1],
    }
    assert config["input"][1]["optional"] is True


# --- infer: JSON -------------------------------------------------------------------


def test_a_json_infer_gives_what_v1_gives_for_the_same_image(client: FlaskClient) -> None:
    image = phantom_png(3, 160, 128)
    answer = client.post(INFER, json={"id": "a-1", "inputs": [_image_input(image)]})
    assert answer.status_code == 200, answer.json
    assert json_of(answer)["id"] == "a-1" and json_of(answer)["model_version"] == "1"
    assert json_of(answer)["parameters"]["method"] == "gradcam"
    outputs = _outputs(json_of(answer))
    v1 = _v1(client, image)
    scores = np.asarray(outputs["probabilities"])
    assert scores.shape == (1, 4)
    for prediction in v1["predictions"]:
        assert scores[0, prediction["index"]] == pytest.approx(prediction["score"], abs=1e-6)
    heat = np.asarray(outputs["heatmap"])
    assert heat.shape == (1, 128, 128)  # the model input's size
    np.testing.assert_allclose(heat[0], v1["explanations"][0]["heatmap"]["values"], atol=1e-6)
    assert outputs["labels"] == [p["label"] for p in v1["predictions"]]  # [1, 4], flat
    assert list(np.asarray(outputs["target"])) == [v1["explanations"][0]["target"]["index"]]
    png = Image.open(io.BytesIO(base64.b64decode(outputs["heatmap_png"][0])))  # type: ignore[arg-type]
    assert png.format == "PNG" and png.size == (128, 128)


def test_parameters_choose_method_layer_size_targets_and_top_k(
    client: FlaskClient, runtime: Runtime
) -> None:
    images = [phantom_png(s, 96, 96) for s in (1, 2)]
    body = {
        "parameters": {"method": "layercam", "heatmap_size": "original", "top_k": 2},
        "inputs": [
            _image_input(*images),
            {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, -1]},
        ],
        "outputs": [{"name": "heatmap"}, {"name": "labels"}, {"name": "target"}],
    }
    answer = client.post(INFER, json=body)
    assert answer.status_code == 200, answer.json
    assert json_of(answer)["parameters"]["method"] == "layercam"
    outputs = _outputs(json_of(answer))
    assert [o["name"] for o in json_of(answer)["outputs"]] == ["heatmap", "labels", "target"]
    assert np.asarray(outputs["heatmap"]).shape == (2, 96, 96)
    assert len(outputs["labels"]) == 4  # [2, 2] flattened
    top = _v1(client, images[1])["explanations"][0]["target"]["index"]
    assert list(np.asarray(outputs["target"])) == [1, top]
    # One class for every image, by label; the layer's own grid.
    body = {
        "parameters": {"target": "tube", "heatmap_size": "layer"},
        "inputs": [_image_input(*images)],
        "outputs": [{"name": "target"}, {"name": "heatmap"}],
    }
    outputs = _outputs(json_of(client.post(INFER, json=body)))
    tube = runtime.catalog().get(MODEL).class_index("tube")
    assert list(np.asarray(outputs["target"])) == [tube, tube]
    assert np.asarray(outputs["heatmap"]).shape[1] < 96


# --- infer: binary tensors ---------------------------------------------------------


def _binary_request(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(text)),
        "Content-Type": "application/octet-stream",
    }


def test_binary_tensors_in_and_out_read_by_tritons_own_parser(client: FlaskClient) -> None:
    image = phantom_png(4, 128, 128)
    images = pack_bytes([image, image])
    body, headers = _binary_request(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(images)},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        images,
    )
    answer = client.post(INFER, data=body, headers=headers)
    assert answer.status_code == 200, answer.data[:300]
    length = int(answer.headers["Inference-Header-Content-Length"])
    parsed = triton.InferResult.from_response_body(answer.data, header_length=length)
    heat = parsed.as_numpy("heatmap")
    assert heat.dtype == np.float32 and heat.shape == (2, 128, 128)
    np.testing.assert_allclose(
        heat[1], _v1(client, image)["explanations"][0]["heatmap"]["values"], atol=1e-6
    )
    assert parsed.as_numpy("probabilities").shape == (2, 4)
    assert parsed.as_numpy("target").dtype == np.int64
    pngs = parsed.as_numpy("heatmap_png")
    assert Image.open(io.BytesIO(pngs[0])).size == (128, 128)
    assert parsed.as_numpy("labels").shape == (2, 4)
    # 64 KiB of float32 per map instead of a JSON list of numbers.
    assert len(answer.data) < 2 * 128 * 128 * 4 + 40_000


def test_bytes_tensors_pack_and_unpack() -> None:
    elements = [b"", b"\x00\xff" * 3, b"png"]
    packed = pack_bytes(elements)
    assert packed[:4] == struct.pack("<I", 0)
    assert unpack_bytes(packed, "x", 3) == elements
    with pytest.raises(BadRequest, match="inside an element's length"):
        unpack_bytes(packed + b"\x01", "x", 4)
    with pytest.raises(BadRequest, match="more than the 3 elements"):
        unpack_bytes(packed + b"\x01", "x", 3)
    with pytest.raises(BadRequest, match="runs past"):
        unpack_bytes(struct.pack("<I", 10) + b"abc", "x", 1)


# --- errors: the protocol's shape, our statuses and messages -----------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": [_image_input(b"not an image")]}, 415, ["Image 0"]),
        ({"inputs": []}, 422, ["inputs"]),
        (
            {"inputs": [{**_image_input(phantom_png(1, 64, 64)), "name": "images"}]},
            422,
            ["'image'", "Rename 'images' to 'image'"],
        ),
        (
            {"inputs": [{**_image_input(phantom_png(1, 64, 64)), "shape": [2]}]},
            422,
            ["2 elements", "1 elements of data"],
        ),
        (
            {"inputs": [_image_input(phantom_png(1, 64, 64))], "outputs": [{"name": "heatmaps"}]},
            422,
            ["Did you mean 'heatmap'"],
        ),
        (
            {
                "parameters": {"method": "gradcam+"},
                "inputs": [_image_input(phantom_png(1, 64, 64))],
            },
            422,
            ["method", "gradcam++"],
        ),
        (
            {"parameters": {"target": "tubes"}, "inputs": [_image_input(phantom_png(1, 64, 64))]},
            422,
            ["no class 'tubes'", "tube"],
        ),
        (
            {
                "parameters": {"heatmap_size": "orig"},
                "inputs": [_image_input(phantom_png(1, 64, 64))],
            },
            422,
            ["Did you mean 'original'"],
        ),
        ({"inputs": [_image_input(*[phantom_png(1, 32, 32)] * 5)]}, 413, ["limit is 4"]),
        (
            {"inputs": [{**_image_input(phantom_png(1, 32, 32)), "shape": [10**10, 10**10]}]},
            413,
            ["limit is 4"],
        ),
        (
            {"inputs": [{**_image_input(), "data": [[[[[[[[[[]]]]]]]]]] * 3, "shape": [0]}]},
            422,
            ["nests its data otherwise than its shape [0]"],
        ),
        ({"inputs": [{**_image_input(), "data": [], "shape": [0]}]}, 422, ["at least 1 item"]),
        (
            {"inputs": [{**_image_input(), "data": [[[encode(b"x")]]], "shape": [1, 1]}]},
            422,
            ["nests its data otherwise than its shape [1, 1]"],
        ),
        (
            {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]},
            422,
            ["Input 'image' is FP32; it must be BYTES"],
        ),
        (
            {
                "inputs": [
                    _image_input(phantom_png(1, 64, 64)),
                    {"name": "target", "shape": [1], "datatype": "FP32", "data": [1.5]},
                ]
            },
            422,
            ["one integer class per image"],
        ),
        (
            {
                "parameters": {"heatmap_size": "original"},
                "inputs": [_image_input(phantom_png(1, 64, 64), phantom_png(1, 80, 64))],
                "outputs": [{"name": "heatmap"}],
            },
            422,
            ["one shape"],
        ),
    ],
)
def test_bad_requests_get_a_protocol_error_that_says_why(
    client: FlaskClient, body: dict[str, Any], status: int, words: list[str]
) -> None:
    _assert_protocol_error(client.post(INFER, json=body), status, *words)


def test_data_nested_as_its_shape_reads_as_flat_data(client: FlaskClient) -> None:
    image = encode(phantom_png(1, 64, 64))
    flat = client.post(INFER, json={"inputs": [{**_image_input(), "data": [image], "shape": [1]}]})
    nested = client.post(
        INFER, json={"inputs": [{**_image_input(), "data": [[image]], "shape": [1, 1]}]}
    )
    assert flat.status_code == nested.status_code == 200, (flat.json, nested.json)
    assert json_of(flat)["outputs"] == json_of(nested)["outputs"]


def test_the_default_outputs_are_charged_for_the_float_map_and_the_png(runtime: Runtime) -> None:
    """By default an infer returns both the float map and its PNG: at original size a
    large image's map is past the array limit, as when only ``heatmap`` is asked for
    (it used to go out, 70-160 MB of JSON for a 4000² JPEG)."""
    client = create_app(
        Settings(device="cpu", max_array_values=64 * 64 - 1), engine=runtime
    ).test_client()
    image = _image_input(phantom_png(1, 64, 64))
    original = {"heatmap_size": "original"}
    for outputs in (None, [{"name": "heatmap"}], [{"name": "heatmap"}, {"name": "heatmap_png"}]):
        body: dict[str, Any] = {"inputs": [image], "parameters": original}
        if outputs is not None:
            body["outputs"] = outputs
        _assert_protocol_error(client.post(INFER, json=body), 413, "'array' heatmaps")
    only_png = {"inputs": [image], "parameters": original, "outputs": [{"name": "heatmap_png"}]}
    assert client.post(INFER, json=only_png).status_code == 200
    at_input = {"inputs": [image], "parameters": {"heatmap_size": "layer"}}
    assert client.post(INFER, json=at_input).status_code == 200


def test_bad_framing_unknown_models_and_routes_are_protocol_errors(client: FlaskClient) -> None:
    _assert_protocol_error(client.post(INFER, data=b"{", content_type="application/json"), 400)
    for nines in ("²", "9" * 5000, "٣"):
        _assert_protocol_error(
            client.post(INFER, data=b"{}", headers={"Inference-Header-Content-Length": nines}),
            400,
            "Inference-Header-Content-Length",
        )
    body, headers = _binary_request({"inputs": [_image_input(b"x")]})
    _assert_protocol_error(
        client.post(
            INFER, data=body, headers={**headers, "Inference-Header-Content-Length": "9e9"}
        ),
        400,
        "Inference-Header-Content-Length",
    )
    blob = pack_bytes([phantom_png(1, 32, 32)])
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob) + 5},
            }
        ]
    }
    body, headers = _binary_request(header, blob)
    _assert_protocol_error(client.post(INFER, data=body, headers=headers), 400, "announces")
    _assert_protocol_error(
        client.post("/v2/models/phantm/infer", json={"inputs": [_image_input(b"x")]}),
        404,
        "Did you mean 'phantom'",
    )
    _assert_protocol_error(client.get(f"/v2/models/{MODEL}/versions/2"), 404, "only version 1")
    _assert_protocol_error(client.get("/v2/nothing"), 404)
    _assert_protocol_error(client.get(INFER), 405)
    # /v1 keeps its own envelope.
    assert "code" in json_of(client.get("/v1/nothing"))["error"]


def test_perf_analyzers_input_data_holds_each_file_as_a_bytes_tensor(tmp_path: Path) -> None:
    script = REPO / "deploy/perf_analyzer/input_data.py"
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, path in enumerate(files):
        path.write_bytes(phantom_png(seed, 32, 32))
    done = subprocess.run(
        [sys.executable, str(script), *map(str, files)], capture_output=True, check=True
    )
    entries = json.loads(done.stdout)["data"]
    for entry, path in zip(entries, files, strict=True):
        tensor = base64.b64decode(entry["image"]["b64"])
        assert unpack_bytes(tensor, "image", 1) == [path.read_bytes()]
    assert subprocess.run([sys.executable, str(script)], capture_output=True).returncode == 2


def test_tokens_guard_the_door_but_not_its_probes(runtime: Runtime) -> None:
    app = create_app(
        Settings(device="cpu", auth_tokens=SecretStr("a-long-enough-test-token-0123456789")),
        engine=runtime,
    ).test_client()
    assert app.get("/v2/health/ready").status_code == 200  # probes carry no token
    assert app.get("/v2/health/live").status_code == 200
    body = {"inputs": [_image_input(phantom_png(1, 64, 64))]}
    refused = app.post(INFER, json=body)
    _assert_protocol_error(refused, 401)
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    _assert_protocol_error(app.get(f"/v2/models/{MODEL}"), 401)
    allowed = app.post(
        INFER, json=body, headers={"Authorization": "Bearer a-long-enough-test-token-0123456789"}
    )
    assert allowed.status_code == 200, allowed.json
