"""DICOM results through the real server: a Secondary Capture, and a Segmentation with its
SR report, each valid (dciodvfy) and of the source's study (what each object holds:
tests/unit/imaging/test_dicom_out.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pydicom
import requests

from tests.helpers import LiveServer, encode
from tests.unit.imaging.test_dicom_out import CR, _report, _valid


def test_dicom_sc_through_the_server(server: LiveServer, tmp_path: Path) -> None:
    body: dict[str, Any] = {
        "images": [encode(CR.read_bytes())],
        "targets": ["nodule"],
        "heatmap": {"format": "dicom-sc"},
    }
    answer = requests.post(f"{server.url}/v1/explain", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    data = answer.json()["results"][0]["explanations"][0]["heatmap"]["data"]
    sc = _valid(base64.b64decode(data), tmp_path)
    assert sc.StudyInstanceUID == pydicom.dcmread(CR).StudyInstanceUID


def test_segmentation_and_report_through_the_server(server: LiveServer, tmp_path: Path) -> None:
    body: dict[str, Any] = {
        "images": [encode(CR.read_bytes())],
        "targets": [["nodule", "mass"]],
        "heatmap": {"format": "dicom-seg"},
        "report": "dicom-sr",
    }
    answer = requests.post(f"{server.url}/v1/explain", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    seg = _valid(base64.b64decode(result["segmentation"]["data"]), tmp_path)
    sr = _valid(base64.b64decode(result["report"]["data"]), tmp_path)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == pydicom.dcmread(CR).StudyInstanceUID
    evidence = {uids[2] for uids in _report(sr).get_evidence()}
    assert seg.SOPInstanceUID in evidence
