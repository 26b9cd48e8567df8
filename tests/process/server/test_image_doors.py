"""An image straight in, through a real server: a raw image body or a form of images, with
the options in the query, answered in JSON or as the picture itself; the same answers as
the JSON door's, the same errors and limits, the same Origin check; and the README's curl
recipe, run with the real curl."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from service.contract.responses import ExplainResponse
from tests.helpers import EXAMPLES, REPO, LiveServer, encode, form_body, missing_tool, phantom_png

TIMEOUT = 60
MASS_TUBE = EXAMPLES / "phantom_mass_tube.png"


def _explain(server: LiveServer, query: str = "", **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/explain{query}", timeout=TIMEOUT, **kwargs)


def _json_door(server: LiveServer, images: list[bytes], **fields: Any) -> dict[str, Any]:
    answer = _explain(server, json={"images": [encode(i) for i in images], **fields})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _error(answer: requests.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error: dict[str, Any] = answer.json()["error"]
    return error


def test_a_raw_png_body_gets_the_json_doors_answer(server: LiveServer) -> None:
    image = MASS_TUBE.read_bytes()
    answer = _explain(
        server, "?target=tube&top_k=2", data=image, headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    ExplainResponse.model_validate_json(answer.content)
    assert answer.json() == _json_door(server, [image], targets=["tube"], top_k=2)


def test_accept_image_png_gets_the_picture_with_the_json_doors_scores(server: LiveServer) -> None:
    image = phantom_png(7, 233, 171)
    answer = _explain(
        server,
        "?target=nodule&size=original",
        data=image,
        headers={"Content-Type": "image/png", "Accept": "image/png"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(answer.content))
    assert picture.format == "PNG" and picture.size == (233, 171) and picture.mode == "RGB"
    same = _json_door(server, [image], targets=["nodule"])
    result = same["results"][0]
    explanation = result["explanations"][0]
    assert answer.content == base64.b64decode(explanation["heatmap"]["data"])
    headers = answer.headers
    assert json.loads(headers["X-Gradcam-Predictions"]) == result["predictions"]
    assert json.loads(headers["X-Gradcam-Target"]) == explanation["target"]
    top = result["predictions"][0]
    assert headers["X-Gradcam-Top-Class"] == top["label"]
    assert int(headers["X-Gradcam-Top-Index"]) == top["index"]
    assert float(headers["X-Gradcam-Score"]) == top["score"]
    assert float(headers["X-Gradcam-Raw-Max"]) == explanation["heatmap"]["raw_max"]
    assert (headers["X-Gradcam-Model"], headers["X-Gradcam-Layer"]) == (
        same["model"],
        same["layer"],
    )


def test_a_form_of_two_images_with_an_options_field(server: LiveServer) -> None:
    images = [phantom_png(8, 120, 90), MASS_TUBE.read_bytes()]
    options = {"targets": [None, ["mass", "tube"]], "heatmap": {"format": "gray", "size": "input"}}
    body, content_type = form_body(
        [("images", images[0]), ("options", json.dumps(options)), ("images", images[1])]
    )
    # Accept image/png: two images cannot be one picture, so the answer stays JSON.
    answer = _explain(
        server, data=body, headers={"Content-Type": content_type, "Accept": "image/png"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    got = answer.json()
    assert [len(r["explanations"]) for r in got["results"]] == [1, 2]
    assert got == _json_door(server, images, **options)


def test_a_dicom_body(server: LiveServer) -> None:
    dicom = (EXAMPLES / "phantom_nodule.dcm").read_bytes()
    answer = _explain(
        server,
        "?format=array&size=layer",
        data=dicom,
        headers={"Content-Type": "application/dicom"},
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["predictions"][0]["label"] == "nodule"
    assert answer.json() == _json_door(
        server, [dicom], heatmap={"format": "array", "size": "layer"}
    )
    # As the picture: the DICOM's own pixel grid.
    picture = _explain(
        server, "?format=overlay", data=dicom, headers={"Content-Type": "application/octet-stream"}
    )
    assert picture.headers["Content-Type"] == "image/png"
    size = Image.open(io.BytesIO(picture.content)).size
    assert size == (result["width"], result["height"])


@pytest.mark.parametrize(
    "query,status,code,field",
    [
        ("?top_k=abc", 422, "invalid_field", "top_k"),
        ("?topk=2", 422, "invalid_field", "topk"),
        ("?format=overlay&format=png", 422, "invalid_field", "format"),
        ("?format=ovrlay", 422, "invalid_field", "heatmap.format"),
        ("?model=phantm", 404, "unknown_model", "model"),
        ("?target=tumour", 422, "unknown_label", "targets[0]"),
        ("?layer=features.99", 422, "unknown_layer", "layer"),
    ],
)
def test_bad_query_values_are_4xx_json(
    server: LiveServer, query: str, status: int, code: str, field: str
) -> None:
    answer = _explain(
        server,
        query,
        data=phantom_png(9, 64, 64),
        headers={"Content-Type": "image/png", "Accept": "image/png"},
    )
    error = _error(answer, status)
    assert (error["code"], error["field"]) == (code, field), error


def test_a_body_over_the_limit_is_a_413(server: LiveServer) -> None:
    """The session's server takes 8 MiB; the worker refuses a larger body, of any door."""
    too_big = b"\0" * (8 * 2**20 + 1)
    for content_type in ("image/png", "application/octet-stream"):
        answer = _explain(server, data=too_big, headers={"Content-Type": content_type})
        assert _error(answer, 413)["code"] == "request_too_large"
    body, content_type = form_body([("image", too_big)])
    answer = _explain(server, data=body, headers={"Content-Type": content_type})
    assert _error(answer, 413)["code"] == "request_too_large"


def test_a_page_on_another_site_cannot_drive_the_image_doors(server: LiveServer) -> None:
    """A form needs no CORS preflight: from another origin it is a 403. An image body
    does: the browser asks first, and the answer names no origin, so it never sends it."""
    body, content_type = form_body([("image", phantom_png(10, 64, 64))])
    evil = "https://evil.example"
    answer = _explain(server, data=body, headers={"Content-Type": content_type, "Origin": evil})
    assert _error(answer, 403)["code"] == "forbidden"
    answer = _explain(server, data=body, headers={"Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    asked = requests.options(
        f"{server.url}/v1/explain",
        headers={
            "Origin": evil,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=TIMEOUT,
    )
    assert asked.status_code == 204 and "Access-Control-Allow-Origin" not in asked.headers


def test_the_readme_recipe_with_the_real_curl(server: LiveServer, tmp_path: Path) -> None:
    """The README's first recipe, as written there but for the port: curl writes the
    overlay, a PNG on the example image's pixel grid, the JSON door's overlay."""
    curl = shutil.which("curl")
    if curl is None:
        missing_tool("curl", "curl")
    readme = (REPO / "README.md").read_text()
    recipe = next(line for line in readme.splitlines() if line.startswith("curl --data-binary @"))
    assert recipe.endswith("-o overlay.png"), recipe
    recipe = recipe.replace("localhost:8000", f"127.0.0.1:{server.port}")
    # Run where the README's reader stands (the repository), writing into tmp_path.
    recipe = recipe.replace("-o overlay.png", f"-o {tmp_path / 'overlay.png'}")
    done = subprocess.run(
        ["sh", "-c", recipe.replace("curl ", f"{curl} -sS --fail-with-body ", 1)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sent = REPO / recipe.split("@", 1)[1].split()[0]
    written = (tmp_path / "overlay.png").read_bytes()
    overlay = Image.open(io.BytesIO(written))
    assert overlay.format == "PNG" and overlay.size == Image.open(sent).size
    target = recipe.split("target=", 1)[1].split("&", 1)[0]
    same = _json_door(server, [sent.read_bytes()], targets=[target], heatmap={"format": "overlay"})
    assert written == base64.b64decode(same["results"][0]["explanations"][0]["heatmap"]["data"])
