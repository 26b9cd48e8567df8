"""Class codes through the real server, its engine in another process (the codes themselves:
tests/unit/imaging/test_dicom_codes.py)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.helpers import ServerFactory, encode
from tests.unit.imaging.test_dicom_codes import CODES, CR, NODULE, _finding_types, _models_file


@pytest.mark.slow
def test_a_served_models_file_codes_the_report(live_server: ServerFactory, tmp_path: Path) -> None:
    """Through the real server, its engine in another process: the SR names SNOMED's
    nodule."""
    live = live_server(models_file=_models_file(tmp_path, CODES))
    body: dict[str, Any] = {
        "images": [encode(CR.read_bytes())],
        "targets": [["nodule"]],
        "report": "dicom-sr",
    }
    answer = requests.post(f"{live.url}/v1/explain", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()["results"][0]["report"]["data"]
    assert _finding_types(pydicom.dcmread(io.BytesIO(base64.b64decode(data)))) == [NODULE]
