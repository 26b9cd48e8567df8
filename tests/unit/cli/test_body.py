"""gradcam-service body: the request a server takes, written from files and flags."""

from __future__ import annotations

import json
from pathlib import Path

from service.cli import main
from tests.helpers import EXAMPLES


def test_body_asks_for_a_report(tmp_path: Path) -> None:
    out = tmp_path / "body.json"
    args = [str(EXAMPLES / "phantom_nodule.dcm"), "--format", "dicom-seg", "--report", "dicom-sr"]
    assert main(["body", *args, "-o", str(out)]) == 0
    body = json.loads(out.read_bytes())
    assert body["heatmap"] == {"format": "dicom-seg"} and body["report"] == "dicom-sr"
