"""The web page's server side: its files, their headers and access, and the API
extras it relies on (``include: ["image", "dicom"]``). The page itself is driven
in a real browser in ``test_browser.py``."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask.testing import FlaskClient
from PIL import Image

from service.contract.errors import PayloadTooLarge
from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.contract.terms import METHODS
from service.engine.runtime import Runtime
from service.imaging.dicom import decode_dicom
from service.imaging.render import COLORMAP
from service.pipeline.explain import explain
from service.server.app import create_app
from tests.helpers import REPO, as_json, encode, json_of, phantom_png

EXAMPLES = REPO / "examples"
TOKEN = "page-test-token-0123456789abcdef"


def _client(runtime: Runtime, **settings: object) -> FlaskClient:
    return create_app(Settings.model_validate(settings), engine=runtime).test_client()


def _page_config(html: str) -> dict:
    found = re.search(
        r'<script id="page-config" type="application/json">(.*?)</script>', html, re.S
    )
    assert found, "the page carries its configuration"
    config: dict = json.loads(found.group(1))
    return config


def test_the_page_and_its_files_are_served_with_a_strict_policy(runtime: Runtime) -> None:
    client = _client(runtime)
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    # Only this origin: no CDN, and an image can be sent nowhere but to this service.
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.get_data(as_text=True)
    assert 'src="page/page.js"' in html and 'href="page/page.css"' in html  # relative: proxies
    assert "http://" not in html and "https://" not in html
    for name, mimetype in (("page.js", "text/javascript"), ("page.css", "text/css")):
        asset = client.get(f"/page/{name}")
        assert asset.status_code == 200 and asset.mimetype == mimetype
        assert b"http://" not in asset.data and b"https://" not in asset.data
        again = client.get(f"/page/{name}", headers={"If-None-Match": asset.headers["ETag"]})
        assert again.status_code == 304
    missing = client.get("/page/index.html")
    assert missing.status_code == 404 and json_of(missing)["error"]["code"] == "not_found"


def test_the_page_draws_with_the_services_colours_and_methods(runtime: Runtime) -> None:
    config = _page_config(_client(runtime).get("/").get_data(as_text=True))
    assert np.array_equal(np.array(config["colormap"]), COLORMAP)
    assert [name for name, _ in config["methods"]] == list(METHODS)


def test_the_page_is_open_while_the_api_needs_a_token(runtime: Runtime) -> None:
    client = _client(runtime, auth_tokens=TOKEN)
    assert client.get("/").status_code == 200
    assert client.get("/page/page.js").status_code == 200
    assert client.get("/v1/models").status_code == 401
    # Nothing else under the page's prefix is open, and no path reaches the API through it.
    assert client.get("/page/../v1/models").status_code in (401, 404)
    authorised = client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorised.status_code == 200


def test_the_page_can_be_turned_off(runtime: Runtime) -> None:
    client = _client(runtime, web_page=False)
    assert client.get("/").status_code == 404
    assert client.get("/page/page.js").status_code == 404
    assert client.get("/v1/models").status_code == 200


def _explain(runtime: Runtime, **body: object) -> dict:
    return as_json(explain(ExplainRequest.model_validate(body), runtime, runtime.settings))


def _picture(encoded: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded["data"]))).convert("RGB"))


def test_include_image_returns_what_overlays_are_drawn_on(runtime: Runtime) -> None:
    png = phantom_png(4, 300, 220)
    body = _explain(
        runtime,
        images=[encode(png)],
        include=["image"],
        heatmap={"format": "gray", "size": "input"},
    )
    result = body["results"][0]
    assert (result["image"]["width"], result["image"]["height"]) == (300, 220)
    assert "dicom" not in result
    shown = _picture(result["image"])
    original = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(shown, original)
    # The same base as the service's own overlay: at a zero heatmap the two agree.
    overlay = _explain(runtime, images=[encode(png)], heatmap={"format": "overlay"})
    levels = _explain(runtime, images=[encode(png)], heatmap={"format": "gray"})
    cold = _picture(levels["results"][0]["explanations"][0]["heatmap"])[..., 0] == 0
    drawn = _picture(overlay["results"][0]["explanations"][0]["heatmap"])
    assert cold.any() and np.array_equal(drawn[cold], shown[cold])


def test_include_dicom_shows_what_a_viewer_would(runtime: Runtime) -> None:
    data = (EXAMPLES / "phantom_nodule.dcm").read_bytes()
    body = _explain(
        runtime, images=[encode(data)], include=["image", "dicom"], heatmap={"format": "none"}
    )
    result = body["results"][0]
    fields = result["dicom"]
    ds = pydicom.dcmread(EXAMPLES / "phantom_nodule.dcm")
    assert fields["PatientName"] == str(ds.PatientName) and fields["PatientID"] == ds.PatientID
    assert fields["Modality"] == "CR" and fields["PhotometricInterpretation"] == "MONOCHROME1"
    assert (fields["Columns"], fields["Rows"]) == (ds.Columns, ds.Rows)
    assert fields["window"] == {
        "source": "file",
        "center": float(ds.WindowCenter),
        "width": float(ds.WindowWidth),
    }
    assert fields["TransferSyntax"] == "Explicit VR Little Endian" and fields["frame"] == 0
    # The picture is the windowed, inverted image (MONOCHROME1: white is 0 in the file).
    shown = _picture(result["image"])[..., 0].astype(np.float64)
    expected = np.asarray(decode_dicom(data, 0, 1, lambda w, h: None, None)) * 255
    assert np.abs(shown - expected).max() <= 0.5 + 1e-6
    stored = ds.pixel_array.astype(np.float64)
    assert np.corrcoef(shown.ravel(), stored.ravel())[0, 1] < -0.99
    # The example is the nodule scene: it is shown as the PNG of that scene is.
    png = np.asarray(Image.open(EXAMPLES / "phantom_nodule.png"), dtype=np.float64)
    resized = np.asarray(Image.fromarray(shown.astype(np.uint8)).resize(png.shape[::-1]))
    assert np.corrcoef(resized.ravel(), png.ravel())[0, 1] > 0.95


def test_include_dicom_is_null_for_other_formats(runtime: Runtime) -> None:
    body = _explain(
        runtime,
        images=[encode(phantom_png(1, 64, 64))],
        include=["dicom"],
        heatmap={"format": "none"},
    )
    assert body["results"][0]["dicom"] is None and "image" not in body["results"][0]


def test_the_image_counts_towards_the_pixels_drawn(runtime: Runtime) -> None:
    settings = runtime.settings.model_copy(update={"max_output_pixels": 150 * 100})
    image = encode(phantom_png(1, 100, 100))
    request = {"images": [image, image], "heatmap": {"format": "none"}}
    explain(ExplainRequest.model_validate(request), runtime, settings)
    with pytest.raises(PayloadTooLarge) as refused:
        explain(ExplainRequest.model_validate({**request, "include": ["image"]}), runtime, settings)
    assert refused.value.code == "output_too_large"


def test_include_takes_known_extras_only(runtime: Runtime) -> None:
    client = _client(runtime)
    answer = client.post(
        "/v1/explain", json={"images": [encode(phantom_png(1, 64, 64))], "include": ["patient"]}
    )
    assert answer.status_code == 422 and json_of(answer)["error"]["field"] == "include[0]"


def test_the_examples_are_offered_and_served(runtime: Runtime) -> None:
    client = _client(runtime, auth_tokens=TOKEN)
    offered = _page_config(client.get("/").get_data(as_text=True))["examples"]
    names = [example["name"] for example in offered]
    expected = [*sorted(p.name for p in EXAMPLES.glob("phantom_*.png")), "phantom_nodule.dcm"]
    assert names == expected
    findings = json.loads((EXAMPLES / "findings.json").read_text())
    for example in offered:
        kinds = {finding["kind"] for finding in findings[example["name"]]["findings"]}
        assert set(example["findings"]) == kinds
        # Open without a token, as the page's own files: synthetic phantoms, no data.
        answer = client.get(f"/page/examples/{example['name']}")
        assert answer.status_code == 200
        assert answer.data == (EXAMPLES / example["name"]).read_bytes()
        assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
    assert client.get("/page/examples/phantom_nodule.png").mimetype == "image/png"
    assert client.get("/page/examples/phantom_nodule.dcm").mimetype == "application/dicom"


@pytest.mark.parametrize(
    "path",
    [
        "/page/examples/findings.json",  # in the folder, but not an example
        "/page/examples/request.json",
        "/page/examples/overlays",
        "/page/examples/../../pyproject.toml",
        "/page/examples/..%2F..%2Fpyproject.toml",
        "/page/examples/%2E%2E/pyproject.toml",
        "/page/examples/..%5Cpyproject.toml",
        "/page/examples/phantom_nodule.png%00.txt",
        "/page/examples/overlays/phantom_nodule-gradcam.png",
        "/page/examples/",
        "/page/examples/PHANTOM_NODULE.PNG",
        "/page/examples//etc/passwd",
        "/page/examples/~/.bashrc",
    ],
)
def test_nothing_but_an_example_is_served_from_the_examples(runtime: Runtime, path: str) -> None:
    client = _client(runtime, auth_tokens=TOKEN)
    answer = client.get(path)
    assert answer.status_code == 404, path
    assert b"[tool." not in answer.data and b"root:" not in answer.data


def test_without_the_examples_folder_none_are_offered(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.server import webpage

    monkeypatch.setattr(webpage, "EXAMPLES_DIR", tmp_path / "absent")
    webpage._examples.cache_clear()
    webpage._index.cache_clear()
    try:
        client = _client(runtime)
        assert _page_config(client.get("/").get_data(as_text=True))["examples"] == []
        assert client.get("/page/examples/phantom_nodule.png").status_code == 404
    finally:
        webpage._examples.cache_clear()
        webpage._index.cache_clear()


def test_the_examples_folder_is_a_setting(runtime: Runtime, tmp_path: Path) -> None:
    # The Docker image has no checkout: it copies the phantoms to /app/examples and
    # names that folder (GRADCAM_EXAMPLES_DIR).
    source = Path(__file__).resolve().parents[3] / "examples" / "phantom_nodule.png"
    (tmp_path / "phantom_nodule.png").write_bytes(source.read_bytes())
    (tmp_path / "findings.json").write_text('{"phantom_nodule.png": {"findings": []}}')
    client = _client(runtime, examples_dir=str(tmp_path))
    offered = _page_config(client.get("/").get_data(as_text=True))["examples"]
    assert [example["name"] for example in offered] == ["phantom_nodule.png"]
    assert client.get("/page/examples/phantom_nodule.png").data == source.read_bytes()
    assert client.get("/page/examples/phantom_opacity.png").status_code == 404
