"""Orthanc routes studies through the service (deploy/orthanc/): a real Orthanc (Debian's
``orthanc``, ``orthanc-dicomweb``, ``orthanc-python``) started with the recipe's own
configuration and plugin on 127.0.0.1, and the real service. Studies arrive by STOW-RS
and by C-STORE (dcmtk's ``storescu``); each series gets exactly one set of results
(one derived series per source image), its own results are not routed again, a
service that is down leaves a failure an operator finds and can retry, and 50 images
routed across a restart of the service each get their results once.

Processes are started here and stopped by their PID (group), within bounded waits."""

from __future__ import annotations

import collections
import glob
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import RLELossless, generate_uid

from service.pipeline.dicomweb import DicomWebServers, store
from tests.helpers import (
    REPO,
    LiveServer,
    ServerFactory,
    answering,
    free_port,
    metric_value,
    missing_tool,
    wait_until,
)
from tests.unit.deploy.test_orthanc_recipe import RECIPE
from tests.unit.deploy.test_orthanc_recipe import router_module as ROUTER

CR = REPO / "examples" / "phantom_nodule.dcm"


def _binaries() -> tuple[str, list[str]]:
    """Orthanc, and its DICOMweb and Python plugins."""
    binary = shutil.which("Orthanc")
    plugins = []
    for name in ("libOrthancDicomWeb.so", "libOrthancPython.so"):
        found = glob.glob(f"/usr/share/orthanc/plugins/{name}*") + glob.glob(
            f"/usr/lib/orthanc/{name}*"
        )
        if found:
            plugins.append(found[0])
    if binary is None or len(plugins) < 2:
        missing_tool(
            "Orthanc with its DICOMweb and Python plugins",
            "orthanc orthanc-dicomweb orthanc-python",
        )
    return binary, plugins


@dataclass
class Orthanc:
    """Orthanc started with the recipe (deploy/orthanc/orthanc.json, unchanged)."""

    process: subprocess.Popen[bytes]
    rest: str
    dicom_port: int
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def get(self, path: str) -> Any:
        answer = requests.get(f"{self.rest}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def lookup(self, uid: str) -> str:
        found = requests.post(f"{self.rest}/tools/lookup", data=uid, timeout=30).json()
        (item,) = found
        return str(item["ID"])

    def state(self, series_uid: str) -> dict[str, Any] | None:
        series_id = self.lookup(series_uid)
        answer = requests.get(
            f"{self.rest}/series/{series_id}/metadata/{ROUTER.METADATA}", timeout=30
        )
        return answer.json() if answer.status_code == 200 else None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_orthanc(folder: Path, http_port: int, service_url: str, **env: str) -> Orthanc:
    """Orthanc on ``http_port`` (loopback only) routing to ``service_url``; ``env``
    overrides the recipe's other variables."""
    binary, plugins = _binaries()
    (folder / "plugins").mkdir(parents=True)
    for plugin in plugins:  # only these two of the system's plugins
        (folder / "plugins" / Path(plugin).name).symlink_to(plugin)
    dicom_port = free_port()
    environ = {
        **os.environ,
        "ORTHANC_STORAGE": str(folder / "db"),
        "ORTHANC_HTTP_PORT": str(http_port),
        "ORTHANC_DICOM_PORT": str(dicom_port),
        "ORTHANC_STABLE_AGE_S": "1",
        "ORTHANC_PLUGINS": str(folder / "plugins"),
        "GRADCAM_ROUTER_SCRIPT": str(RECIPE / "gradcam_router.py"),
        "GRADCAM_SERVICE_URL": service_url,
        "GRADCAM_ROUTER_FIRST_RETRY_DELAY_S": "0.5",
        "GRADCAM_ROUTER_MAX_RETRY_DELAY_S": "2",
        **env,
    }
    log = folder / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, str(RECIPE / "orthanc.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
            start_new_session=True,
        )
    orthanc = Orthanc(process, f"http://127.0.0.1:{http_port}", dicom_port, log)
    try:
        wait_until(
            answering(f"{orthanc.rest}/gradcam/router", process),
            30,
            "Orthanc and its router answering",
            detail=lambda: log.read_text()[-3000:],
        )
    except AssertionError:
        orthanc.stop()
        raise
    return orthanc


@dataclass(frozen=True)
class Series:
    study: str
    uid: str
    instances: tuple[str, ...]  # SOP Instance UIDs
    files: tuple[Path, ...]


def make_series(folder: Path, count: int, study: str | None = None, source: Path = CR) -> Series:
    """``count`` copies of ``source`` (the CR example) with new UIDs: one new series."""
    study = study or str(generate_uid())
    series_uid = str(generate_uid())
    folder.mkdir(parents=True, exist_ok=True)
    files, uids = [], []
    for number in range(1, count + 1):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        path = folder / f"{series_uid}-{number}.dcm"
        ds.save_as(path)
        files.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return Series(study, series_uid, tuple(uids), tuple(files))


def large_radiograph(path: Path, side: int) -> Path:
    """The CR example's header over ``side``×``side`` pixels of a phantom made of flat
    regions (a body, two lungs, a nodule), RLE Lossless: many pixels, few bytes on disk."""
    ds = pydicom.dcmread(CR)
    y, x = (axis / side for axis in np.ogrid[:side, :side])
    pixels = np.full((side, side), 3600, np.uint16)  # MONOCHROME1: high is dark
    pixels[((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.46) ** 2 < 1] = 1800
    for centre in (0.3, 0.7):
        pixels[((x - centre) / 0.14) ** 2 + ((y - 0.48) / 0.3) ** 2 < 1] = 2900
    pixels[(x - 0.64) ** 2 + (y - 0.4) ** 2 < 0.03**2] = 1500
    ds.Rows = ds.Columns = side
    ds.compress(RLELossless, pixels)
    ds.save_as(path)
    return path


def send_stow(orthanc: Orthanc, series: Series) -> None:
    pairs = zip(series.instances, series.files, strict=True)
    objects = [(uid, path.read_bytes()) for uid, path in pairs]
    outcomes = store(objects, orthanc.dicomweb, DicomWebServers(orthanc.dicomweb), 60)
    assert all(outcome.ok for outcome in outcomes), outcomes


def send_cstore(orthanc: Orthanc, series: Series) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        missing_tool("dcmtk's storescu", "dcmtk")
    sent = subprocess.run(
        [
            storescu,
            "-aec",
            "ORTHANC",
            "127.0.0.1",
            str(orthanc.dicom_port),
            *map(str, series.files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr


def wait_routed(orthanc: Orthanc, series: list[Series], timeout_s: float) -> dict[str, dict]:
    """Each series' router state once every one is done, partial or failed."""
    states: dict[str, dict] = {}

    def all_routed() -> bool:
        for one in series:
            if one.uid not in states:
                state = orthanc.state(one.uid)
                if state is not None and state["state"] in ("done", "partial", "failed"):
                    states[one.uid] = state
        return len(states) == len(series)

    wait_until(
        all_routed,
        timeout_s,
        f"{len(series)} series routed",
        detail=lambda: (
            f"{len(series) - len(states)} not: {orthanc.get('/gradcam/router')} "
            f"{orthanc.log.read_text()[-3000:]}"
        ),
    )
    return states


def wait_quiet(orthanc: Orthanc, timeout_s: float = 60) -> None:
    """Until every series is stable and the router has nothing queued or running: its
    own results have come and been looked at."""

    def quiet() -> bool:
        stable = all(orthanc.get(f"/series/{s}")["IsStable"] for s in orthanc.get("/series"))
        status = orthanc.get("/gradcam/router")
        return stable and not status["queued"] and not status["active"]

    wait_until(
        quiet, timeout_s, "Orthanc quiet", detail=lambda: str(orthanc.get("/gradcam/router"))
    )


def results_by_source(orthanc: Orthanc, study: str) -> tuple[collections.Counter[str], int]:
    """How many of the service's series reference each source image, and how many such
    series the study holds."""
    counts: collections.Counter[str] = collections.Counter()
    derived = 0
    for series in orthanc.get(f"/studies/{orthanc.lookup(study)}/series"):
        if series["MainDicomTags"].get("Manufacturer") != "gradcam-service":
            continue
        derived += 1
        metadata = orthanc.get(f"/series/{series['ID']}/metadata")
        assert ROUTER.METADATA not in metadata  # its own results are never routed
        referenced = set()
        for instance in series["Instances"]:
            tags = orthanc.get(f"/instances/{instance}/tags?short")
            referenced |= set(ROUTER._values_of(tags, "0008,1155"))
        for uid in referenced:
            counts[uid] += 1
    return counts, derived


def assert_one_set_each(orthanc: Orthanc, series: list[Series]) -> None:
    by_study: dict[str, list[Series]] = collections.defaultdict(list)
    for one in series:
        by_study[one.study].append(one)
    for study, members in by_study.items():
        counts, derived = results_by_source(orthanc, study)
        sources = [uid for one in members for uid in one.instances]
        assert {uid: counts[uid] for uid in sources} == dict.fromkeys(sources, 1)
        assert derived == len(sources)  # nothing else: no result of a result


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def _dicomweb(http_port: int) -> str:
    """The service's GRADCAM_DICOMWEB_SERVERS: the Orthanc on ``http_port``."""
    return f"http://127.0.0.1:{http_port}/dicom-web"


@pytest.fixture
def stack(folder: Path, live_server: ServerFactory) -> Iterator[tuple[Orthanc, LiveServer]]:
    http_port = free_port()
    live = live_server(dicomweb_servers=_dicomweb(http_port))
    orthanc = start_orthanc(folder / "orthanc", http_port, live.url)
    try:
        yield orthanc, live
    finally:
        orthanc.stop()


def test_studies_sent_by_stow_and_by_cstore_get_one_set_of_results(
    stack: tuple[Orthanc, LiveServer], folder: Path
) -> None:
    orthanc, live = stack
    by_stow = make_series(folder / "stow", 2)
    by_cstore = make_series(folder / "cstore", 3)
    send_stow(orthanc, by_stow)
    send_cstore(orthanc, by_cstore)
    states = wait_routed(orthanc, [by_stow, by_cstore], 120)
    for one in (by_stow, by_cstore):
        state = states[one.uid]
        assert state["state"] == "done", state
        assert state["with_results"] == len(one.instances) and state["left_out"] == {}
    wait_quiet(orthanc)
    assert_one_set_each(orthanc, [by_stow, by_cstore])
    # The service explained the five sources and nothing else.
    text = requests.get(f"{live.url}/metrics", timeout=30).text
    assert metric_value(text, "gradcam_images_explained_total", '{model="phantom"}') == 5
    assert orthanc.get("/gradcam/router")["failed"] == {}


def results_of(orthanc: Orthanc, study: str, source: str) -> list[str]:
    """The modality of each object from the service in ``study`` that references
    ``source``: OT a Secondary Capture, SR a report."""
    found = []
    for series in orthanc.get(f"/studies/{orthanc.lookup(study)}/series"):
        if series["MainDicomTags"].get("Manufacturer") != "gradcam-service":
            continue
        for instance in series["Instances"]:
            tags = orthanc.get(f"/instances/{instance}/tags?short")
            if source in ROUTER._values_of(tags, "0008,1155"):
                found.append(series["MainDicomTags"]["Modality"])
    return sorted(found)


def test_a_report_asked_for_later_is_made_alone(folder: Path, live_server: ServerFactory) -> None:
    """Images routed without a report, then again with GRADCAM_ROUTER_REPORT=dicom-sr:
    the router tells the service's report (SR) from its Secondary Capture and asks for
    the report alone, which the service makes and stores; each image ends with one of
    each, and the report is checked as stored."""
    http_port = free_port()
    live = live_server(dicomweb_servers=_dicomweb(http_port))
    orthanc = None
    try:
        orthanc = start_orthanc(folder / "first", http_port, live.url)
        one = make_series(folder / "stow", 2)
        send_stow(orthanc, one)
        assert wait_routed(orthanc, [one], 120)[one.uid]["state"] == "done"
        wait_quiet(orthanc)
        orthanc.stop()
        orthanc = start_orthanc(
            folder / "second",
            http_port,
            live.url,
            ORTHANC_STORAGE=str(folder / "first" / "db"),
            GRADCAM_ROUTER_REPORT="dicom-sr",
        )
        series_id = orthanc.lookup(one.uid)
        again = requests.post(
            f"{orthanc.rest}/gradcam/router/retry", json=[series_id], timeout=30
        ).json()
        assert again == {"queued": [series_id]}
        wait_quiet(orthanc)
        state = orthanc.state(one.uid)
        assert state is not None and state["state"] == "done", state
        assert state["explained_now"] == 2 and state["requests"] == 1, state
        for uid in one.instances:
            assert results_of(orthanc, one.study, uid) == ["OT", "SR"]
    finally:
        if orthanc is not None:
            orthanc.stop()


def test_a_service_that_is_down_leaves_a_failure_an_operator_can_retry(
    folder: Path, live_server: ServerFactory
) -> None:
    http_port, service_port = free_port(), free_port()
    orthanc = start_orthanc(
        folder / "orthanc",
        http_port,
        f"http://127.0.0.1:{service_port}",
        GRADCAM_ROUTER_RETRIES="2",
        GRADCAM_ROUTER_FIRST_RETRY_DELAY_S="0.2",
        GRADCAM_ROUTER_MAX_RETRY_DELAY_S="0.5",
    )
    try:
        one = make_series(folder / "stow", 1)
        send_stow(orthanc, one)
        state = wait_routed(orthanc, [one], 60)[one.uid]
        assert state["state"] == "failed" and state["retries"] == 2, state
        assert "could not be reached (ConnectionRefusedError)" in state["reason"]
        series_id = orthanc.lookup(one.uid)
        assert series_id in orthanc.get("/gradcam/router")["failed"]
        warnings = [
            line
            for line in orthanc.log.read_text().splitlines()
            if line.startswith("W") and f"series {series_id} failed" in line
        ]
        assert len(warnings) == 1, orthanc.log.read_text()[-3000:]
        # The service comes up; the operator routes the failed series again.
        live_server(dicomweb_servers=_dicomweb(http_port), port=service_port)
        again = requests.post(f"{orthanc.rest}/gradcam/router/retry", timeout=30).json()
        assert again == {"queued": [series_id]}
        wait_until(
            lambda: (orthanc.state(one.uid) or {}).get("state") == "done",
            60,
            "the series routed again",
            detail=lambda: str(orthanc.state(one.uid)),
        )
        wait_quiet(orthanc)
        assert_one_set_each(orthanc, [one])
        assert orthanc.get("/gradcam/router")["failed"] == {}
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_series_of_large_radiographs_are_routed_whole(
    stack: tuple[Orthanc, LiveServer], folder: Path
) -> None:
    """16 and 8 CR images of 2900×2900 (8.4 MP each): the service, at its default limits,
    draws at most 64 MP for one request (GRADCAM_MAX_OUTPUT_PIXELS), 7 such images, and
    refuses a batch of 8 (``output_too_large``, naming the 8th). That is the request's
    limit, not the image's: the router sends smaller batches and every image gets its
    Secondary Capture."""
    orthanc, live = stack
    template = large_radiograph(folder / "large.dcm", 2900)
    assert template.stat().st_size < 1_000_000
    sixteen = make_series(folder / "sixteen", 16, source=template)
    eight = make_series(folder / "eight", 8, source=template)
    send_stow(orthanc, sixteen)
    send_stow(orthanc, eight)
    states = wait_routed(orthanc, [sixteen, eight], 600)
    for one in (sixteen, eight):
        state = states[one.uid]
        assert state["state"] == "done", state
        assert state["left_out"] == {} and state["with_results"] == len(one.instances), state
    wait_quiet(orthanc)
    assert_one_set_each(orthanc, [sixteen, eight])
    status = orthanc.get("/gradcam/router")
    assert status["failed"] == {} and status["partial"] == {}, status
    text = requests.get(f"{live.url}/metrics", timeout=30).text
    assert metric_value(text, "gradcam_images_explained_total", '{model="phantom"}') == 24


@dataclass(frozen=True)
class Figures:
    images: int
    seconds: float  # first series stable to last results stored
    latency_s: list[float]  # per series: stable to results stored

    def __str__(self) -> str:
        return (
            f"{self.images} images in {self.seconds:.1f} s: "
            f"{self.images / self.seconds:.1f} images/s; added latency per series "
            f"(stable to results stored) median {statistics.median(self.latency_s):.1f} s, "
            f"max {max(self.latency_s):.1f} s"
        )


def route_fifty(
    folder: Path,
    restart: bool,
    live_server: ServerFactory,
    series_count: int = 5,
    size: int = 10,
) -> Figures:
    """``series_count`` series of ``size`` images (in two studies) by STOW-RS through a
    fresh Orthanc and a service from ``live_server``; with ``restart``, the service is
    stopped once the first series is routed and started again on the same port."""
    http_port = free_port()
    live = live_server(dicomweb_servers=_dicomweb(http_port))
    orthanc = None
    try:
        orthanc = start_orthanc(
            folder / "orthanc", http_port, live.url, GRADCAM_ROUTER_RETRIES="30"
        )
        studies = [str(generate_uid()), str(generate_uid())]
        sent = [
            make_series(folder / "in", size, studies[number % 2]) for number in range(series_count)
        ]
        for one in sent:
            send_stow(orthanc, one)
        if restart:
            wait_until(lambda: any(orthanc.state(one.uid) for one in sent), 120, "a series routed")
            live.stop()
            # An outage of 2 s: time must pass with the service down for the router to meet
            # refused connections and back off (its retries, asserted below, show it did).
            time.sleep(2)
            live = live_server(dicomweb_servers=_dicomweb(http_port), port=live.port)
        states = wait_routed(orthanc, sent, 300)
        assert all(state["state"] == "done" for state in states.values()), states
        wait_quiet(orthanc)
        assert_one_set_each(orthanc, sent)
        if restart:
            assert sum(state["retries"] for state in states.values()) > 0, states
        first = min(state["stable_at"] for state in states.values())
        last = max(state["finished_at"] for state in states.values())
        return Figures(
            images=series_count * size,
            seconds=last - first,
            latency_s=[state["seconds"] for state in states.values()],
        )
    finally:
        if orthanc is not None:
            orthanc.stop()


@pytest.mark.slow
def test_fifty_images_across_a_restart_of_the_service_get_results_once(
    folder: Path, live_server: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = route_fifty(folder, True, live_server)
    with capsys.disabled():
        print(f"\nrouted through a restart of the service: {figures}")


def test_a_wrong_setting_stops_orthanc_and_is_named(folder: Path) -> None:
    with pytest.raises(AssertionError, match=r"GradcamRouter\.MaxImagesPerRequest"):
        start_orthanc(
            folder / "orthanc", free_port(), "http://127.0.0.1:9", GRADCAM_ROUTER_MAX_IMAGES="100"
        )


def ct_series(folder: Path) -> Series:
    """The volume tests' CT phantom as a DICOM series (24 slices, one new study)."""
    from tests.dicom_series import write_ct_series
    from tests.volume_models import DICOM_ORIGIN, DICOM_SPACING, ct_phantom

    folder.mkdir(parents=True, exist_ok=True)
    data = write_ct_series(ct_phantom(), DICOM_SPACING, DICOM_ORIGIN, signed=True)
    files, uids = [], []
    for number, one in enumerate(data):
        path = folder / f"ct-{number}.dcm"
        path.write_bytes(one)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return Series(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), tuple(uids), tuple(files))


def test_a_ct_series_comes_back_as_one_parametric_map_and_report(
    folder: Path, live_server: ServerFactory
) -> None:
    """A CT series sent to Orthanc goes whole to the volume model (one request) and comes
    back as one multi-frame Parametric Map per class (a frame per slice, each slice
    referenced) and one SR report, once; a radiograph beside it still goes as an image."""
    from tests.volume_models import write_models

    http_port = free_port()
    models = write_models(folder / "models")
    live = live_server(dicomweb_servers=_dicomweb(http_port), models_file=models)
    rules = '[{"Model": "ct3d", "Modalities": ["CT"]}]'
    orthanc = start_orthanc(
        folder / "orthanc",
        http_port,
        live.url,
        GRADCAM_ROUTER_VOLUME_MODELS=rules,
        GRADCAM_ROUTER_MODEL="phantom",
        GRADCAM_ROUTER_REPORT="dicom-sr",
    )
    try:
        ct = ct_series(folder / "ct")
        radiograph = make_series(folder / "cr", 1)
        send_stow(orthanc, ct)
        send_stow(orthanc, radiograph)
        states = wait_routed(orthanc, [ct, radiograph], 180)
        assert states[ct.uid]["state"] == "done", states[ct.uid]
        assert states[ct.uid]["requests"] == 1 and states[ct.uid]["with_results"] == 24
        assert states[radiograph.uid]["state"] == "done", states[radiograph.uid]
        wait_quiet(orthanc)
        counts, _ = results_by_source(orthanc, ct.study)
        # Every slice referenced by exactly two objects: the map of the top class (no
        # targets: one explanation) and the report.
        assert {uid: counts[uid] for uid in ct.instances} == dict.fromkeys(ct.instances, 2)
        maps = [
            series
            for series in orthanc.get(f"/studies/{orthanc.lookup(ct.study)}/series")
            if series["MainDicomTags"].get("Manufacturer") == "gradcam-service"
            and series["MainDicomTags"].get("Modality") != "SR"
        ]
        (pm_series,) = maps
        (instance,) = pm_series["Instances"]
        tags = orthanc.get(f"/instances/{instance}/tags?simplify")
        assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.30"
        assert int(tags["NumberOfFrames"]) == 24
        text = requests.get(f"{live.url}/metrics", timeout=30).text
        assert metric_value(text, "gradcam_images_explained_total", '{model="ct3d"}') == 1
    finally:
        orthanc.stop()
