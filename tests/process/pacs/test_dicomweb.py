"""DICOMweb in and out against a real Orthanc with its DICOMweb plugin (Debian's
``orthanc`` and ``orthanc-dicomweb``), started here on loopback and stopped by PID:
upload a study, explain an instance by its UIDs through the real server, store the
Secondary Capture (and a Parametric Map, a Segmentation, an SR report) back with
STOW-RS, find it with QIDO-RS, fetch it with WADO-RS and validate it. And the fences:
only configured servers, only UIDs in paths."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from service.pipeline.dicomweb import _parts
from tests.helpers import (
    REPO,
    LiveServer,
    ServerFactory,
    answering,
    encode,
    missing_tool,
    pydicom_file,
    wait_until,
)
from tests.unit.imaging.test_dicom_out import _valid, measurements

EXAMPLES = REPO / "examples"
CR = EXAMPLES / "phantom_nodule.dcm"
CT = pydicom_file("CT_small.dcm")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _orthanc() -> tuple[str, str]:
    binary = shutil.which("Orthanc")
    plugins = glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*") + glob.glob(
        "/usr/lib/orthanc/libOrthancDicomWeb.so*"
    )
    if binary and plugins:
        return binary, plugins[0]
    missing_tool("Orthanc with its DICOMweb plugin", "orthanc orthanc-dicomweb")


@dataclass
class Orthanc:
    url: str  # the DICOMweb root
    rest: str  # Orthanc's own REST API


@contextmanager
def _running_orthanc(folder: Path, *options: str) -> Iterator[Orthanc]:
    """An Orthanc with its DICOMweb plugin in ``folder``, holding the phantom CR study and
    pydicom's CT; stopped by its PID. ``options`` go on its command line (its log is
    ``folder/log``)."""
    binary, plugin = _orthanc()
    port = _free_port()
    config = {
        "Name": "gradcam-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        # Orthanc cannot bind to one address; it answers loopback clients only.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    with (folder / "log").open("wb") as log:
        process = subprocess.Popen(
            [binary, *options, str(folder / "config.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    rest = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            answering(f"{rest}/system", process),
            30,
            "Orthanc answering",
            detail=(folder / "log").read_text,
        )
        # The phantom study (and a CT), uploaded with Orthanc's own API.
        for path in (CR, CT):
            assert requests.post(f"{rest}/instances", data=path.read_bytes(), timeout=30).ok
        yield Orthanc(url=f"{rest}/dicom-web", rest=rest)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with _running_orthanc(tmp_path_factory.mktemp("orthanc")) as running:
        yield running


@pytest.fixture(scope="module")
def live(orthanc: Orthanc, module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(dicomweb_servers=orthanc.url)


def _by_uids(url: str, path: Path) -> dict:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "dicomweb": {
            "url": url,
            "study": ds.StudyInstanceUID,
            "series": ds.SeriesInstanceUID,
            "instance": ds.SOPInstanceUID,
        }
    }


def _explain(live: LiveServer, body: dict) -> requests.Response:
    return requests.post(f"{live.url}/v1/explain", json=body, timeout=120)


def _wado(url: str, study: str, series: str, instance: str) -> bytes:
    response = requests.get(
        f"{url}/studies/{study}/series/{series}/instances/{instance}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:300]
    (part,) = _parts(response.headers["Content-Type"], response.content)
    return part


def test_explain_by_uids_and_store_the_result(
    orthanc: Orthanc, live: LiveServer, tmp_path: Path
) -> None:
    body = {
        "images": [_by_uids(orthanc.url, CR)],
        "targets": [["nodule", "mass"]],
        "heatmap": {"format": "dicom-sc"},
        "store": {"url": orthanc.url},
    }
    answer = _explain(live, body)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["predictions"][0]["label"] == "nodule"
    # The same answer as for the bytes themselves.
    sent = _explain(live, {**body, "images": [encode(CR.read_bytes())], "store": None})
    assert [p["index"] for p in sent.json()["results"][0]["predictions"]] == [
        p["index"] for p in result["predictions"]
    ]
    source = pydicom.dcmread(CR, stop_before_pixels=True)
    for explanation in result["explanations"]:
        heatmap = explanation["heatmap"]
        assert heatmap["stored"]["ok"], heatmap["stored"]
        uids = heatmap["uids"]
        assert uids["study"] == source.StudyInstanceUID
        # QIDO-RS finds the new series in the source's study, with this instance in it.
        series = requests.get(
            f"{orthanc.url}/studies/{uids['study']}/series",
            params={"SeriesInstanceUID": uids["series"]},
            timeout=30,
        ).json()
        assert len(series) == 1
        instances = requests.get(
            f"{orthanc.url}/studies/{uids['study']}/series/{uids['series']}/instances", timeout=30
        ).json()
        found = {item["00080018"]["Value"][0] for item in instances}
        assert uids["instance"] in found
        # WADO-RS gives it back; it is valid and is what the answer carried.
        stored = _valid(
            _wado(orthanc.url, uids["study"], uids["series"], uids["instance"]), tmp_path
        )
        assert stored.SOPInstanceUID == uids["instance"]
        assert (stored.Rows, stored.Columns) == (source.Rows, source.Columns)
        returned = pydicom.dcmread(io.BytesIO(base64.b64decode(heatmap["data"])))
        assert (stored.pixel_array == returned.pixel_array).all()


def test_a_parametric_map_of_a_ct_is_stored(
    orthanc: Orthanc, live: LiveServer, tmp_path: Path
) -> None:
    body = {
        "images": [_by_uids(orthanc.url, CT)],
        "heatmap": {"format": "dicom-pm"},
        "store": {"url": orthanc.url},
    }
    answer = _explain(live, body)
    assert answer.status_code == 200, answer.text
    heatmap = answer.json()["results"][0]["explanations"][0]["heatmap"]
    assert heatmap["stored"]["ok"]
    uids = heatmap["uids"]
    pm = _valid(_wado(orthanc.url, uids["study"], uids["series"], uids["instance"]), tmp_path)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"


def test_a_segmentation_and_a_report_are_stored(
    orthanc: Orthanc, live: LiveServer, tmp_path: Path
) -> None:
    """dicom-seg with report dicom-sr, stored in one STOW-RS call: both come back by WADO-RS,
    pass dciodvfy, read back with highdicom as what the answer carried, and the stored
    report names the stored Segmentation. A report stored alone (format png) too."""
    import highdicom as hd

    body = {
        "images": [_by_uids(orthanc.url, CT)],
        "targets": [["nodule", "mass"]],
        "heatmap": {"format": "dicom-seg"},
        "report": "dicom-sr",
        "store": {"url": orthanc.url},
    }
    answer = _explain(live, body)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    stored = {}
    for key in ("segmentation", "report"):
        made = result[key]
        assert made["stored"]["ok"], made["stored"]
        uids = made["uids"]
        stored[key] = _valid(
            _wado(orthanc.url, uids["study"], uids["series"], uids["instance"]), tmp_path
        )
        assert stored[key].SOPInstanceUID == uids["instance"]
        assert uids["study"] == pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    seg = hd.seg.Segmentation.from_dataset(stored["segmentation"])
    returned = pydicom.dcmread(io.BytesIO(base64.b64decode(result["segmentation"]["data"])))
    assert (seg.pixel_array == returned.pixel_array).all()
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["nodule", "mass"]
    report = hd.sr.Comprehensive3DSR.from_dataset(stored["report"])
    assert len(measurements(report).get_planar_roi_measurement_groups()) == 2
    evidence = {uids[2] for uids in report.get_evidence()}
    assert result["segmentation"]["uids"]["instance"] in evidence
    # A report with a picture format: the report alone is stored.
    alone = _explain(
        live, {**body, "heatmap": {"format": "png"}, "images": [_by_uids(orthanc.url, CR)]}
    )
    assert alone.status_code == 200, alone.text
    result = alone.json()["results"][0]
    assert result["report"]["stored"]["ok"] and "segmentation" not in result
    assert all("stored" not in e["heatmap"] for e in result["explanations"])
    uids = result["report"]["uids"]
    _valid(_wado(orthanc.url, uids["study"], uids["series"], uids["instance"]), tmp_path)


def test_only_configured_servers_and_real_uids(orthanc: Orthanc, live: LiveServer) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = []
    elsewhere = _by_uids("http://127.0.0.1:9/dicom-web", CR)
    cases.append(({"images": [elsewhere]}, 403, "dicomweb_not_allowed"))
    other_path = _by_uids(orthanc.rest + "/other", CR)
    cases.append(({"images": [other_path]}, 403, "dicomweb_not_allowed"))
    bad_uid = _by_uids(orthanc.url, CR)
    bad_uid["dicomweb"]["series"] = "1.2/../../instances"
    cases.append(({"images": [bad_uid]}, 422, "invalid_field"))
    unknown = _by_uids(orthanc.url, CR)
    unknown["dicomweb"]["instance"] = "1.2.3.4.5"
    cases.append(({"images": [unknown]}, 422, "dicomweb_not_found"))
    cases.append(
        (
            {
                "images": [_by_uids(orthanc.url, CR)],
                "heatmap": {"format": "png"},
                "store": {"url": orthanc.url},
            },
            422,
            "invalid_field",
        )
    )
    cases.append(
        (
            {
                "images": [_by_uids(orthanc.url, CR)],
                "heatmap": {"format": "dicom-sc"},
                "store": {"url": "http://127.0.0.1:9/dicom-web"},
            },
            403,
            "dicomweb_not_allowed",
        )
    )
    for body, status, code in cases:
        answer = _explain(live, body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["code"] == code, answer.text
    assert "Traceback" not in live.read_log()


def test_an_allowed_server_that_is_down_is_a_502(live_server: ServerFactory) -> None:
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    server = live_server(dicomweb_servers=url)
    answer = _explain(server, {"images": [_by_uids(url, CR)]})
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "dicomweb_unreachable"


def test_audit_a_study_list_from_dicomweb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gradcam-service audit --dicomweb``: QIDO-RS finds every instance of the listed
    studies, WADO-RS fetches each; a study that is not there is a clear error. On an
    Orthanc of its own: the other tests store their objects into these studies."""
    with _running_orthanc(tmp_path) as orthanc:
        _audit(orthanc, tmp_path, capsys)


def _audit(orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import EXIT_OK, EXIT_USAGE, main

    cr = pydicom.dcmread(CR, stop_before_pixels=True)
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    studies = tmp_path / "studies.txt"
    studies.write_text(
        f"# the phantom and the CT\n{orthanc.url}/studies/{cr.StudyInstanceUID}\n"
        f"{orthanc.url}/studies/{ct.StudyInstanceUID}/\n"
    )
    out = tmp_path / "out"
    assert main(["audit", "--dicomweb", str(studies), "-q", "--out", str(out)]) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    keys = {r["key"]: r for r in report["images"]}
    phantom_key = f"{cr.StudyInstanceUID}/{cr.SeriesInstanceUID}/{cr.SOPInstanceUID}"
    assert set(keys) == {
        phantom_key,
        f"{ct.StudyInstanceUID}/{ct.SeriesInstanceUID}/{ct.SOPInstanceUID}",
    }
    assert keys[phantom_key]["explained"] == "nodule" and keys[phantom_key]["error"] is None
    studies.write_text(f"{orthanc.url}/studies/1.2.3.4\n")
    assert main(["audit", "--dicomweb", str(studies), "-q", "--out", str(tmp_path / "o")]) == (
        EXIT_USAGE
    )
    assert "lists no instance of that study" in capsys.readouterr().err
