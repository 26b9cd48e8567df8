"""Every DICOM file pydicom and pydicom-data bundle, explained as a Secondary Capture, as
a Parametric Map and as a Segmentation with an SR report: a clear 4xx, a clear reason, or
objects that pass dciodvfy, never a 5xx.

Real files break what hand-made ones do not (an IS of "1A", a Pixel Spacing of zero,
"999.999..." UIDs, a Frame of Reference UID equal to the Study UID, "WHOLE BODY" with a
space); this sweep is where they were found (#20).
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from pydicom.data import get_testdata_files
from pydicom.misc import is_dicom

from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.server.app import create_app
from tests.helpers import dciodvfy_errors, json_of


def _files() -> list[str]:
    found = sorted(f for f in get_testdata_files("**/*") if os.path.isfile(f) and is_dicom(f))
    # pydicom's own files (~90) plus pydicom-data's (~130): the sweep is meant for both.
    assert len(found) > 200, "pip install pydicom-data (in the dev extras)"
    return found


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> FlaskClient:
    return create_app(Settings(device="cpu", out_of_domain="mark"), engine=runtime).test_client()


@pytest.mark.slow
def test_every_bundled_dicom_file_gets_a_4xx_or_valid_objects(
    client: FlaskClient, tmp_path: Path
) -> None:
    outcomes: Counter[tuple[str, str]] = Counter()
    invalid: list[tuple[str, str, list[str]]] = []
    for path in _files():
        image = base64.b64encode(Path(path).read_bytes()).decode()
        name = Path(path).name
        for fmt in ("dicom-sc", "dicom-pm", "dicom-seg"):
            request = {"images": [image], "heatmap": {"format": fmt}, "frame": 0}
            if fmt == "dicom-seg":
                # Two classes (the phantom sees no mass in most files: an empty segment),
                # and the report that names the Segmentation.
                request |= {"targets": [["nodule", "mass"]], "report": "dicom-sr"}
            answer = client.post("/v1/explain", json=request)
            body = json_of(answer)
            assert answer.status_code < 500, (name, fmt, body)
            if answer.status_code != 200:
                error = body["error"]
                assert error["code"] and error["message"][0].isupper(), (name, error)
                outcomes[(fmt, error["code"])] += 1
                continue
            result = body["results"][0]
            objects = {fmt: result["explanations"][0]["heatmap"]}
            if fmt == "dicom-seg":
                objects = {fmt: result["segmentation"], "dicom-sr": result["report"]}
            for kind, made in objects.items():
                if "data" not in made:
                    assert made["reason"], (name, kind)
                    outcomes[(kind, "reason")] += 1
                    continue
                outcomes[(kind, "made")] += 1
                written = tmp_path / "made.dcm"
                written.write_bytes(base64.b64decode(made["data"]))
                errors, _ = dciodvfy_errors(written)
                if errors:
                    invalid.append((name, kind, errors[:3]))
    assert not invalid, invalid
    # Most files make objects: the sweep is not passing by refusing everything.
    assert outcomes[("dicom-sc", "made")] >= 120, outcomes
    assert outcomes[("dicom-pm", "made")] >= 20, outcomes
    assert outcomes[("dicom-seg", "made")] >= 90, outcomes
    assert outcomes[("dicom-sr", "made")] >= 130, outcomes
