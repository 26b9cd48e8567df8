"""What a client sends never reaches a metric label, a log line or an error body.

Through a real server: random HTTP methods and paths leave the number of metric
series unchanged; a token in the query string is not logged; DICOM files whose
identifying attributes hold canary strings, valid and malformed, go through every
output format and every error path, and no canary appears in the log, in
``/metrics`` or in any error body; malformed header values give DICOM objects
with those values corrected or blanked, never a 500.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import string
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.helpers import (
    REPO,
    LiveServer,
    ServerFactory,
    dciodvfy_errors,
    encode,
    phantom_png,
    pydicom_file,
)

TOKEN = "hardening-token-0123456789abcdef"
EXAMPLES = REPO / "examples"
CR = EXAMPLES / "phantom_nodule.dcm"  # no Frame of Reference: Secondary Capture only
CT = pydicom_file("CT_small.dcm")  # a Frame of Reference: Parametric Map too
# Never reached: a store to it fails inside the answer, a fetch from it is refused first.
PACS = "http://127.0.0.1:9/dicom-web"

# Canaries in every attribute that identifies a person or a study. "Valid" ones are
# conformant values; "malformed" ones break their value representation.
VALID = {
    # One component, as many real files have it: highdicom warns about such a name and
    # quotes it, so the warning's text must stay out of the log.
    "PatientName": "CANARYPNVALID",
    "PatientID": "CANARYPID1",
    "PatientBirthDate": "19111111",
    "AccessionNumber": "CANARYACC1",
    "StudyID": "CANARYSID1",
    "ReferringPhysicianName": "CANARYDOC^VALID",
    "InstitutionName": "CANARYINST1",
    "StudyDescription": "CANARYSTUDY1",
    "OperatorsName": "CANARYOP^VALID",
    "OtherPatientIDs": "CANARYOPID1",
    "PatientAddress": "CANARYADDR1",
}
MALFORMED = {
    "PatientName": "CANARYPN" * 10,  # a PN component over 64 characters
    "PatientID": "CANARYPID2" * 8,  # LO over 64
    "PatientBirthDate": "1911-11-11",  # ISO, not DA
    "PatientSex": "canarysex",  # not a CS value, nor M/F/O
    "StudyDate": "2001/02/03",
    "StudyTime": "CANARYTIME",
    "AccessionNumber": "CANARYACC2-" * 3,  # SH over 16
    "StudyID": "CANARYSID2-" * 3,
    "ReferringPhysicianName": "CANARYDOC" * 10,
    "InstitutionName": "CANARYINST2" * 8,
}
CANARIES = ("CANARY", "canary", "1911-11-11", "19111111", "2001/02/03")


def _with(path: Path, values: dict[str, str]) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def live(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(auth_tokens=TOKEN, dicomweb_servers=PACS)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _explain(server: LiveServer, **body: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/explain", json=body, headers=_auth(), timeout=60)


def _infer(server: LiveServer, images: list[str], **body: Any) -> requests.Response:
    tensor: dict[str, Any] = {
        "name": "image",
        "shape": [len(images)],
        "datatype": "BYTES",
        "data": images,
    }
    return requests.post(
        f"{server.url}/v2/models/phantom/infer",
        json={"inputs": [tensor], **body},
        headers=_auth(),
        timeout=60,
    )


def _scrape(server: LiveServer) -> str:
    return requests.get(f"{server.url}/metrics", headers=_auth(), timeout=10).text


def _series(scrape: str) -> set[str]:
    return {line.split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_random_methods_and_paths_add_no_metric_series(live: LiveServer) -> None:
    rng = random.Random(17)

    def token(n: int) -> str:
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))

    bearer = f"Authorization: Bearer {TOKEN}\r\n"
    # One of each kind first (with and without a token), so that its series exist.
    for auth in ("", bearer):
        for method, path in (("FOO", "/v1/explain"), ("GET", "/nowhere"), ("BREW", "/x")):
            _raw(
                live.port,
                f"{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: 0\r\n\r\n".encode(),
            )
    _scrape(live)
    before = _series(_scrape(live))
    for i in range(1000):
        method = token(rng.randint(3, 12))
        path = "/" + "/".join(token(rng.randint(1, 8)) for _ in range(rng.randint(1, 4)))
        auth = bearer if i % 2 else ""
        answer = _raw(
            live.port,
            f"{method} {path}?q={token(5)} HTTP/1.1\r\nHost: t\r\n"
            f"{auth}Content-Length: 0\r\n\r\n".encode(),
        )
        assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")), answer[:100]
        assert not answer.startswith(b"HTTP/1.1 500")
    after = _series(_scrape(live))
    assert after == before, sorted(after - before)[:10]
    assert 'method="other"' in "".join(after)


def test_a_token_in_the_query_string_is_not_logged(live: LiveServer) -> None:
    secret = "query-token-" + "7" * 24
    requests.get(f"{live.url}/v1/models?access_token={secret}&x=CANARYQUERY", timeout=5)
    requests.get(f"{live.url}/v1/models?access_token={secret}", headers=_auth(), timeout=5)
    log = live.read_log()
    assert secret not in log and "CANARYQUERY" not in log
    assert '"GET /v1/models"' in log  # the access line is there, without its query


@pytest.mark.parametrize("values", [VALID, MALFORMED], ids=["valid", "malformed"])
def test_canaries_reach_no_log_metric_or_error(
    live: LiveServer, values: dict[str, str], tmp_path: Path
) -> None:
    cr, ct = encode(_with(CR, values)), encode(_with(CT, values))
    outputs = []
    for fmt in ("overlay", "array", "gray", "none", "dicom-sc", "dicom-pm", "dicom-seg"):
        for image in (cr, ct):
            outputs.append(
                _explain(
                    live,
                    images=[image],
                    heatmap={"format": fmt},
                    include=["dicom", "image"] if fmt == "overlay" else [],
                    # The SR report beside a picture and beside a Segmentation.
                    **({"report": "dicom-sr"} if fmt in ("gray", "dicom-seg") else {}),
                )
            )
    outputs.append(_explain(live, images=[ct], heatmap={"format": "dicom-sc", "encoding": "jpeg"}))
    stored = _explain(live, images=[ct], heatmap={"format": "dicom-pm"}, store={"url": PACS})
    stored_seg = _explain(
        live, images=[ct], heatmap={"format": "dicom-seg"}, report="dicom-sr", store={"url": PACS}
    )
    for answer in [*outputs, stored, stored_seg]:
        assert answer.status_code == 200, answer.text[:300]
    assert stored.json()["results"][0]["explanations"][0]["heatmap"]["stored"]["ok"] is False
    result = stored_seg.json()["results"][0]
    assert result["segmentation"]["stored"]["ok"] is False
    assert result["report"]["stored"]["ok"] is False
    made = [
        e["heatmap"]
        for answer in outputs
        for e in answer.json()["results"][0]["explanations"]
        if e["heatmap"]["format"] in ("dicom-sc", "dicom-pm")
    ] + [
        answer.json()["results"][0][key]
        for answer in outputs
        for key in ("segmentation", "report")
        if key in answer.json()["results"][0]
    ]
    assert len(made) >= 11 and all("data" in h for h in made if "reason" not in h)
    assert sum("data" in h for h in made) >= 10
    for heatmap in made:
        if "data" not in heatmap:
            continue
        obj = pydicom.dcmread(io.BytesIO(base64.b64decode(heatmap["data"])))
        if values is MALFORMED:  # corrected where certain, else blanked
            assert obj.PatientBirthDate == "19111111"
            assert obj.StudyDate == "20010203"
            assert obj.PatientSex == "" and obj.StudyTime == ""
            assert str(obj.PatientName) == "" and obj.AccessionNumber == ""
        else:
            assert obj.PatientID == "CANARYPID1" and obj.PatientBirthDate == "19111111"
    # Every error path with the same files.
    errors = [
        _explain(live, images=[cr], frame=7),  # no such frame
        _explain(live, images=[cr], targets=["no-such-class"]),
        _explain(live, images=[cr], layer="no.such.layer"),
        _explain(live, images=[cr], top_k=0),
        _explain(live, images=[cr, ct], targets=[None]),
        _explain(live, images=[cr[: len(cr) // 2]]),  # a truncated file
        _explain(live, images=[cr], heatmap={"format": "dicom-sc", "size": "input"}),
        _explain(
            live,
            images=[
                {"dicomweb": {"url": PACS, "study": "1.2", "series": "1.2", "instance": "1.2\n"}}
            ],
        ),
        requests.post(f"{live.url}/v1/explain", json={"images": [cr]}, timeout=10),  # no token
        # The Open Inference Protocol door's error paths, with the same files.
        _infer(live, [ct], parameters={"target": "no-such-class"}),
        _infer(live, [cr], parameters={"frame": 7}),
        _infer(live, [cr[: len(cr) // 2]]),
    ]
    answer = _infer(live, [cr, ct], outputs=[{"name": "labels"}, {"name": "heatmap_png"}])
    assert answer.status_code == 200, answer.text[:300]
    for canary in CANARIES:
        assert canary not in answer.text
    for answer in errors:
        assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:200])
        for canary in CANARIES:
            assert canary not in answer.text, (canary, answer.text[:300])
    scrape = _scrape(live)
    log = live.read_log()
    for canary in CANARIES:
        assert canary not in scrape
        assert canary not in log, [line for line in log.splitlines() if canary in line][:3]
    assert "Traceback" not in log


def test_a_malformed_header_gives_valid_objects(live: LiveServer, tmp_path: Path) -> None:
    """dciodvfy finds no error in objects made from the malformed header."""
    ct = encode(_with(CT, MALFORMED))
    for fmt in ("dicom-sc", "dicom-pm", "dicom-seg"):
        answer = _explain(live, images=[ct], heatmap={"format": fmt}, report="dicom-sr")
        assert answer.status_code == 200, answer.text[:300]
        result = answer.json()["results"][0]
        objects = {
            fmt: result["segmentation"]
            if fmt == "dicom-seg"
            else result["explanations"][0]["heatmap"],
            "dicom-sr": result["report"],
        }
        for kind, made in objects.items():
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(base64.b64decode(made["data"]))
            errors, report = dciodvfy_errors(path)
            assert not errors, report


def test_an_invalid_uid_is_a_reason_naming_the_attribute(live: LiveServer) -> None:
    data = _with(CT, {"StudyInstanceUID": "1.2.CANARY.3"})
    answer = _explain(live, images=[encode(data)], heatmap={"format": "dicom-sc"}, include=[])
    assert answer.status_code == 200, answer.text[:300]
    heatmap = answer.json()["results"][0]["explanations"][0]["heatmap"]
    assert "StudyInstanceUID" in heatmap["reason"] and "CANARY" not in heatmap["reason"]
    assert "data" not in heatmap
    assert "CANARY" not in live.read_log()


def test_a_good_request_still_answers(live: LiveServer) -> None:
    answer = _explain(
        live, images=[encode(phantom_png(1, 64, 64))], heatmap={"format": "array", "size": "layer"}
    )
    assert answer.status_code == 200
    assert json.loads(answer.text)["results"][0]["predictions"]
