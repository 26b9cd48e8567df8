"""The results in the OHIF viewer, as a radiologist would see them: a real Orthanc with
its DICOMweb plugin, the real service storing its objects there (STOW-RS), OHIF's built
viewer (npm's ``@ohif/app``, the version in deploy/ohif/VERSION) served with its
DICOMweb from one origin by deploy/ohif/serve.py with deploy/ohif/app-config.js, and
headless Chromium (Debian's, driven by Playwright).

Checked on what OHIF draws, not only on its page: the study browser lists each result
series by its modality and description; the Secondary Capture, opened in the
viewport, is drawn with the service's own colours where the service put them (the
viewport's canvas, sampled on the image's grid, equals the stored object's pixels); and
the Parametric Map of a CT is laid over the CT in colour where the map is high.

OHIF's files come from ``deploy/ohif/fetch.sh`` (npm; ``.ci/run`` runs it), in
``.cache/ohif/<version>/dist`` or ``GRADCAM_OHIF_DIST``; without them the tests are
skipped (failed in CI). ``GRADCAM_OHIF_SCREENSHOT=docs/ohif.png`` keeps the screenshot
for the README.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from tests.helpers import LiveServer, free_port
from tests.test_browser import browser, playwright_api  # noqa: F401 (the fixture)
from tests.test_dicomweb import CR, CT, Orthanc, _by_uids, orthanc  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[1]
OHIF = REPO / "deploy" / "ohif"
VERSION = (OHIF / "VERSION").read_text().strip()
FINDINGS = json.loads((REPO / "examples" / "findings.json").read_text())
TIMEOUT_MS = 60_000
# A pixel is "in colour" when its channels differ by more than this (grey has none).
CHROMA = 40

pytestmark = pytest.mark.slow
expect = playwright_api.expect


def _dist() -> Path:
    given = os.environ.get("GRADCAM_OHIF_DIST")
    dist = Path(given) if given else REPO / ".cache" / "ohif" / VERSION / "dist"
    if (dist / "index.html").is_file():
        return dist
    message = f"OHIF's files are not in {dist}: deploy/ohif/fetch.sh fetches them (npm)"
    if os.environ.get("CI"):
        pytest.fail(message + "; .ci/run runs it")
    pytest.skip(message)


@dataclass(frozen=True)
class Stored:
    """One object the service stored: its UIDs, and the object as answered."""

    study: str
    series: str
    dataset: pydicom.Dataset


@dataclass(frozen=True)
class Results:
    cr_sc: Stored  # the phantom radiograph's Secondary Capture (nodule)
    ct_sc: Stored  # pydicom's CT slice: a Secondary Capture
    ct_pm: Stored  # and a Parametric Map


def _store(live: LiveServer, pacs: Orthanc, source: Path, form: str, target: str) -> Stored:
    body = {
        "images": [_by_uids(pacs.url, source)],
        "targets": [[target]],
        "heatmap": {"format": form},
        "store": {"url": pacs.url},
    }
    answer = requests.post(f"{live.url}/v1/explain", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    heatmap = answer.json()["results"][0]["explanations"][0]["heatmap"]
    assert heatmap["stored"]["ok"], heatmap["stored"]
    dataset = pydicom.dcmread(io.BytesIO(base64.b64decode(heatmap["data"])))
    return Stored(heatmap["uids"]["study"], heatmap["uids"]["series"], dataset)


@pytest.fixture(scope="module")
def results(orthanc: Orthanc) -> Results:  # noqa: F811 (the imported fixture)
    """The service's objects, stored in Orthanc beside their sources (the service is
    stopped once they are: OHIF reads Orthanc alone)."""
    _dist()
    live = LiveServer(env={"GRADCAM_DICOMWEB_SERVERS": orthanc.url})
    try:
        return Results(
            cr_sc=_store(live, orthanc, CR, "dicom-sc", "nodule"),
            ct_sc=_store(live, orthanc, CT, "dicom-sc", "opacity"),
            ct_pm=_store(live, orthanc, CT, "dicom-pm", "opacity"),
        )
    finally:
        live.stop()


@pytest.fixture(scope="module")
def viewer(orthanc: Orthanc) -> Iterator[str]:  # noqa: F811
    """deploy/ohif/serve.py on a free port: OHIF's files, and Orthanc at /dicom-web."""
    dist = _dist()
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(OHIF / "serve.py"),
            "--dist",
            str(dist),
            "--dicomweb",
            orthanc.url,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            try:
                if requests.get(f"{url}/app-config.js", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            pytest.fail("serve.py did not answer in 20 s")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


class Viewer:
    """One tab of OHIF, collecting the page's errors."""

    def __init__(self, browser: object, url: str) -> None:  # noqa: F811
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.url = url

    def open_study(self, study: str) -> None:
        """The viewer on one study, as a person gets there: past OHIF's notice (it is for
        investigational use) and its guided tour."""
        self.page.goto(f"{self.url}/viewer?StudyInstanceUIDs={study}")
        self.page.get_by_role("button", name="Confirm and hide").click()
        self.page.get_by_text("Skip all").click()
        expect(self.thumbnails().first).to_be_visible()

    def thumbnails(self) -> object:
        return self.page.locator('[data-cy^="study-browser-thumbnail"]')

    def listed(self) -> list[str]:
        """Each series in the study browser: its modality label and description."""
        return [
            " | ".join(part.strip() for part in item.inner_text().split("\n") if part.strip())
            for item in self.thumbnails().all()  # type: ignore[attr-defined]
        ]

    def show(self, series_number: int, description: str | None = None) -> None:
        """Double-click a series in the study browser (and wait until the viewport names
        it, for an image series; a map is laid over its source instead)."""
        item = self.thumbnails().filter(has_text=f"S:{series_number}")  # type: ignore[attr-defined]
        item.dblclick()
        if description is not None:
            overlay = self.page.locator('[data-cy="viewport-overlay-top-left"]')
            expect(overlay).to_contain_text(description)

    def canvas(self) -> np.ndarray:
        """The viewport's pixels, as OHIF drew them: (H, W, 3) uint8."""
        canvas = self.page.locator("canvas.cornerstone-canvas").first
        data_url = canvas.evaluate("canvas => canvas.toDataURL('image/png')")
        png = base64.b64decode(data_url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def wait_canvas(self, ready: object, what: str) -> np.ndarray:
        """The viewport's pixels once ``ready(pixels)`` holds (OHIF draws asynchronously)."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while True:
            pixels = self.canvas()
            if ready(pixels):  # type: ignore[operator]
                return pixels
            if time.monotonic() > deadline:
                shot = Path(tempfile.mkdtemp(prefix="ohif-")) / "viewer.png"
                self.page.screenshot(path=str(shot))
                pytest.fail(f"the viewport never showed {what} (the page: {shot})")
            self.page.wait_for_timeout(200)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ohif(browser: object, viewer: str) -> Iterator[Viewer]:  # noqa: F811
    tab = Viewer(browser, viewer)
    yield tab
    errors = tab.errors
    tab.close()
    assert not errors, errors


def _coloured(pixels: np.ndarray) -> np.ndarray:
    wide = pixels.astype(np.int16)
    return (wide.max(axis=-1) - wide.min(axis=-1)) > CHROMA  # type: ignore[no-any-return]


def _on_image_grid(pixels: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The viewport sampled at the centre of each image pixel, for an image shown whole
    and centred (OHIF's default: fit to the viewport)."""
    height, width = pixels.shape[:2]
    scale = min(width / columns, height / rows)
    top, left = (height - rows * scale) / 2, (width - columns * scale) / 2
    ys = np.clip((top + (np.arange(rows) + 0.5) * scale).astype(int), 0, height - 1)
    xs = np.clip((left + (np.arange(columns) + 0.5) * scale).astype(int), 0, width - 1)
    return pixels[np.ix_(ys, xs)]


def test_the_study_list_finds_both_studies(ohif: Viewer, results: Results) -> None:
    ohif.page.goto(ohif.url + "/")
    ohif.page.get_by_role("button", name="Confirm and hide").click()
    for patient in ("PHANTOM, NODULE", "CompressedSamples"):
        expect(ohif.page.get_by_text(patient)).to_be_visible()


def test_the_secondary_capture_is_drawn_with_the_heatmap_colours(
    ohif: Viewer, results: Results
) -> None:
    sc = results.cr_sc.dataset
    ohif.open_study(results.cr_sc.study)
    listed = ohif.listed()
    assert any("PA (synthetic)" in item and "S:1" in item for item in listed), listed
    assert any(item.startswith("OT | Grad-CAM nodule | S:9901") for item in listed), listed
    # The source first (OHIF's default): grey, no colour anywhere.
    source = ohif.wait_canvas(lambda p: p.mean() > 20, "the source image")
    assert _coloured(source).mean() < 0.001
    ohif.show(9901, "Grad-CAM nodule")
    drawn = ohif.wait_canvas(lambda p: _coloured(p).sum() > 500, "the heatmap's colours")
    # On the image's grid, OHIF's pixels are the Secondary Capture's own.
    expected = sc.pixel_array.astype(np.int16)
    seen = _on_image_grid(drawn, sc.Rows, sc.Columns).astype(np.int16)
    heat = _coloured(expected)
    assert heat.sum() > 200
    assert np.abs(seen - expected).mean() < 3
    assert np.abs(seen[heat] - expected[heat]).mean() < 5
    assert (_coloured(seen) == heat).mean() > 0.99
    # And those colours lie on the nodule: its box holds the reddest pixel.
    redness = seen[..., 0] - seen[..., 1:].max(axis=-1)
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    boxes = [f["box"] for f in FINDINGS["phantom_nodule.dcm"]["findings"] if f["kind"] == "nodule"]
    assert any(x0 - 8 <= x <= x1 + 8 and y0 - 8 <= y <= y1 + 8 for x0, y0, x1, y1 in boxes)
    assert redness.max() > 80
    shot = os.environ.get("GRADCAM_OHIF_SCREENSHOT")
    if shot:
        ohif.page.screenshot(path=shot)


def test_the_parametric_map_is_laid_over_the_ct(ohif: Viewer, results: Results) -> None:
    pm = results.ct_pm.dataset
    ohif.open_study(results.ct_pm.study)
    listed = ohif.listed()
    assert any(item.startswith("CT | S:1") for item in listed), listed
    assert any(item.startswith("OT | Grad-CAM opacity | S:9901") for item in listed), listed
    assert any(item.startswith("PMAP | Grad-CAM opacity | S:9902") for item in listed), listed
    ct = ohif.wait_canvas(lambda p: p.mean() > 20, "the CT")
    assert _coloured(ct).mean() < 0.001
    ohif.show(9902)
    fused = ohif.wait_canvas(lambda p: _coloured(p).mean() > 0.05, "the map's colours")
    values = pm.pixel_array.astype(np.float32)
    seen = _coloured(_on_image_grid(fused, pm.Rows, pm.Columns))
    # Colour where the map is high, the CT's grey where it is nothing.
    assert seen[values >= 0.5].mean() > 0.98, seen[values >= 0.5].mean()
    assert seen[values <= 0.02].mean() < 0.02, seen[values <= 0.02].mean()


@pytest.mark.skip(
    reason="needs the dicom-seg and dicom-sr results (branch dicomseg), not in main yet"
)
def test_the_segmentation_is_overlaid_and_the_report_listed() -> None:
    """Once the service stores a Segmentation and an SR report: both listed in the study
    browser (SEG, SR), and the SEG laid over the radiograph in its segment's colour."""
