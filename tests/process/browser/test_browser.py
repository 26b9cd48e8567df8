"""The web page at / in a real browser: headless Chromium (Debian's, driven by
Playwright) against a live server with authentication on and CORS off.

What a person would do: open the page, give the token, drop shipped examples,
pick a target, look at the overlay, click a prediction, compare methods,
download the overlay, open a DICOM file, try a bad file. Checked on what the
page draws: the canvas is not blank, the heatmap's hottest pixels lie in the
finding's known box, the page's blend equals the service's own overlay, and
axe-core finds no accessibility violation. The page's Content Security Policy
stays on (Playwright's evaluate runs outside it), and any console error fails.

``GRADCAM_PAGE_SCREENSHOT=docs/web-page.png`` keeps the screenshot for docs/web-page.md.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from service.demo.evaluation import peak_in_boxes
from service.imaging.render import COLORMAP
from tests.helpers import REPO, LiveServer, ServerFactory, encode, missing_tool, pydicom_file

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

EXAMPLES = REPO / "examples"
FINDINGS = json.loads((EXAMPLES / "findings.json").read_text())
TOKEN = "browser-test-token-0123456789abcdef"
CHROMIUM = os.environ.get("GRADCAM_CHROMIUM", "/usr/bin/chromium")
HOTTEST = COLORMAP[255].astype(np.int32)  # the colour of a heatmap's maximum
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow


def _chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    missing_tool("chromium (or set GRADCAM_CHROMIUM)", "chromium")


@pytest.fixture(scope="module")
def live(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(auth_tokens=TOKEN)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = _chromium()
    with playwright_api.sync_playwright() as driver:
        # Root cannot use Chromium's sandbox (CI machines run as root).
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = driver.chromium.launch(executable_path=executable, args=args)
        yield launched
        launched.close()


class PageUnderTest:
    """One tab on the page, collecting what the browser console says."""

    def __init__(self, browser: object, url: str, viewport: tuple[int, int] = (1280, 900)) -> None:
        self.context = browser.new_context(  # type: ignore[attr-defined]
            viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", self._console)
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.goto(url)

    def _console(self, message: object) -> None:
        text = message.text  # type: ignore[attr-defined]
        # Chromium logs every non-2xx fetch; the page shows those itself (checked below).
        if message.type == "error" and "Failed to load resource" not in text:  # type: ignore[attr-defined]
            self.errors.append(text)

    def connect(self) -> None:
        """Give the token the way a person would: type it, press the button."""
        expect(self.page.locator("#notice")).to_contain_text("bearer token")
        self.page.fill("#token", TOKEN)
        self.page.click("#use-token")
        expect(self.page.locator("#layer option")).not_to_have_count(0)
        expect(self.page.locator("#notice")).to_be_empty()

    def card(self, name: str) -> Any:
        return self.page.locator(".card", has=self.page.locator(".card-title", has_text=name))

    def canvas(self, name: str, index: int = 0) -> np.ndarray:
        """The pixels of a figure's canvas, as the page drew them."""
        canvas = self.card(name).locator(".figure canvas").nth(index)
        data_url = canvas.evaluate("canvas => canvas.toDataURL('image/png')")
        png = base64.b64decode(data_url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def wait_explained(self, name: str, figures: int, target: str) -> None:
        card = self.card(name)
        expect(card.locator(".figure")).to_have_count(figures)
        for caption in card.locator(".figure figcaption").all():
            expect(caption).to_contain_text(f"· {target} (")
        expect(card).not_to_have_attribute("aria-busy", "true")

    def set_opacity(self, percent: int) -> None:
        """With the keyboard, as a person without a mouse would."""
        slider = self.page.locator("#opacity")
        slider.focus()
        slider.press("End" if percent == 100 else "Home")
        if percent not in (0, 100):
            slider.fill(str(percent))
        expect(self.page.locator("#opacity-value")).to_have_text(f"{percent}%")
        self.page.evaluate("() => new Promise(requestAnimationFrame)")

    def axe_violations(self) -> list[dict]:
        """axe-core's WCAG 2.1 A/AA checks on the page as it is now."""
        import axe_playwright_python

        source = Path(axe_playwright_python.__file__).with_name("axe.min.js").read_text()
        self.page.evaluate(source)
        found: list[dict] = self.page.evaluate("""async () => {
            const result = await axe.run(document, {runOnly: {type: "tag",
                values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]}});
            return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.map(n => n.target.join(" ")).slice(0, 5)}));
        }""")
        return found

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(live: LiveServer, browser: object) -> Iterator[PageUnderTest]:
    opened = PageUnderTest(browser, live.url + "/")
    yield opened
    opened.close()
    assert not opened.errors, opened.errors
    assert "Traceback" not in live.read_log()


def _heat_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """At 100% opacity a pixel at the heatmap's maximum is exactly the hottest colour:
    closeness to it is a map whose peak is the heatmap's."""
    return -np.abs(pixels.astype(np.int32) - HOTTEST).sum(axis=2).astype(np.float64)


def _boxes(name: str, kind: str) -> list[tuple[float, float, float, float]]:
    return [tuple(f["box"]) for f in FINDINGS[name]["findings"] if f["kind"] == kind]


def _service_overlay(live: LiveServer, name: str, target: str) -> np.ndarray:
    body: dict[str, Any] = {
        "images": [encode((EXAMPLES / name).read_bytes())],
        "targets": [target],
        "heatmap": {"format": "overlay"},
    }
    answer = requests.post(
        f"{live.url}/v1/explain",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 200, answer.text
    data = answer.json()["results"][0]["explanations"][0]["heatmap"]["data"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_explain_an_example_with_a_chosen_target(tab: PageUnderTest, live: LiveServer) -> None:
    page = tab.page
    tab.connect()
    assert not tab.axe_violations(), tab.axe_violations()
    page.select_option("#target", label="0: nodule")
    name = "phantom_four_findings.png"
    page.set_input_files("#files", str(EXAMPLES / name))
    tab.wait_explained(name, 1, "nodule")

    # At the default 60% the page draws exactly the service's own overlay.
    drawn = tab.canvas(name)
    assert drawn.shape[:2] == (FINDINGS[name]["height"], FINDINGS[name]["width"])
    assert drawn.std() > 20, "the canvas is blank"
    reference = _service_overlay(live, name, "nodule")
    assert np.abs(drawn.astype(int) - reference.astype(int)).max() <= 2

    # Full opacity: the hottest pixels lie on a nodule.
    tab.set_opacity(100)
    assert peak_in_boxes(_heat_from_pixels(tab.canvas(name)), _boxes(name, "nodule"), 8.0)
    tab.set_opacity(0)
    plain = np.asarray(Image.open(EXAMPLES / name).convert("RGB"))
    assert np.array_equal(tab.canvas(name), plain)

    # A click on a prediction explains that class; the list says which one is shown.
    card = tab.card(name)
    card.locator(".prediction", has_text="tube").click()  # type: ignore[attr-defined]
    tab.wait_explained(name, 1, "tube")
    pressed = card.locator(".prediction[aria-pressed=true]")  # type: ignore[attr-defined]
    expect(pressed).to_contain_text("tube")
    tab.set_opacity(100)
    assert peak_in_boxes(_heat_from_pixels(tab.canvas(name)), _boxes(name, "tube"), 8.0)

    # The download is the overlay as drawn, as a PNG of the image's size.
    with page.expect_download() as download:
        card.locator(".download").first.click()  # type: ignore[attr-defined]
    saved = Image.open(download.value.path())
    assert saved.format == "PNG" and saved.size == (
        FINDINGS[name]["width"],
        FINDINGS[name]["height"],
    )
    assert download.value.suggested_filename.endswith("-gradcam-tube.png")


def test_methods_side_by_side_several_images_and_a_bad_file(
    tab: PageUnderTest, tmp_path: Path
) -> None:
    page = tab.page
    tab.connect()
    page.check("#method-1")
    page.check("#method-3")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    names = ["phantom_nodule.png", "phantom_mass_tube.png"]
    page.set_input_files("#files", [str(EXAMPLES / n) for n in names] + [str(bad)])
    for name, kind in zip(names, ["nodule", "mass"], strict=True):
        tab.wait_explained(name, 3, kind)
        captions = tab.card(name).locator(".figure figcaption").all_inner_texts()  # type: ignore[attr-defined]
        assert [c.split(" · ")[0] for c in captions] == ["Grad-CAM", "Grad-CAM++", "Layer-CAM"]
    # The API's own message, not a generic failure; the other images are unaffected.
    error = tab.card("notes.png").locator(".card-error")  # type: ignore[attr-defined]
    # ... naming the file, not "Image 0" (each card sends its image alone).
    expect(error).to_contain_text("notes.png is not in a supported image format")
    expect(error).to_contain_text("unsupported_image")
    expect(page.locator("#status")).to_contain_text("1 of 3 image(s) failed")
    tab.set_opacity(100)
    for index in range(3):
        heat = _heat_from_pixels(tab.canvas("phantom_nodule.png", index))
        assert peak_in_boxes(heat, _boxes("phantom_nodule.png", "nodule"), 8.0), index
    assert not tab.axe_violations(), tab.axe_violations()


def test_a_dicom_file_is_shown_as_a_viewer_would(tab: PageUnderTest) -> None:
    tab.connect()
    name = "phantom_nodule.dcm"
    tab.page.set_input_files("#files", str(EXAMPLES / name))
    tab.wait_explained(name, 1, "nodule")
    fields = (
        tab.card(name)
        .locator(".dicom")
        .evaluate(  # type: ignore[attr-defined]
            "list => Object.fromEntries([...list.querySelectorAll('div')].map("
            "group => [group.querySelector('dt').textContent,"
            " group.querySelector('dd').textContent]))"
        )
    )
    assert fields["Patient"] == "PHANTOM, NODULE" and fields["Born"] == "1970-01-01"
    assert fields["Modality"] == "CR" and fields["Photometric"] == "MONOCHROME1"
    assert fields["Window"] == "centre 1024, width 4096 (from the file)"
    assert fields["Size"] == "420×380"
    tab.set_opacity(0)
    shown = tab.canvas(name)
    # MONOCHROME1, windowed: the lungs are dark and the body bright, as in the PNG.
    png = np.asarray(
        Image.open(EXAMPLES / "phantom_nodule.png").resize(
            (FINDINGS[name]["width"], FINDINGS[name]["height"])
        ),
        dtype=np.float64,
    )
    assert np.corrcoef(shown[..., 0].ravel(), png.ravel())[0, 1] > 0.95
    tab.set_opacity(100)
    assert peak_in_boxes(_heat_from_pixels(tab.canvas(name)), _boxes(name, "nodule"), 8.0)
    # Methods added later re-explain the images already on the page.
    tab.page.check("#method-1")
    tab.page.check("#method-3")
    tab.wait_explained(name, 3, "nodule")
    tab.set_opacity(60)
    screenshot = os.environ.get("GRADCAM_PAGE_SCREENSHOT")
    if screenshot:
        tab.page.locator("#opacity").blur()
        tab.page.screenshot(path=screenshot, full_page=True)


def test_keyboard_only(tab: PageUnderTest) -> None:
    """Every control is reached with Tab, and a prediction is chosen with Enter."""
    page = tab.page
    tab.connect()
    page.set_input_files("#files", str(EXAMPLES / "phantom_mass_tube.png"))
    tab.wait_explained("phantom_mass_tube.png", 1, "mass")
    page.locator("body").focus()
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(
            page.evaluate(
                "() => document.activeElement.id || document.activeElement.textContent.trim()"
            )
        )
    for control in (
        "token",
        "use-token",
        "model",
        "layer",
        "target",
        "top-k",
        "method-0",
        "opacity",
        "files",
        "explain",
    ):
        assert control in reached, (control, reached)
    tube = next(r for r in reached if r.startswith("tube"))
    page.locator(".prediction", has_text="tube").focus()
    assert tube
    page.keyboard.press("Enter")
    tab.wait_explained("phantom_mass_tube.png", 1, "tube")


def test_a_wrong_token_is_said_plainly(tab: PageUnderTest) -> None:
    page = tab.page
    expect(page.locator("#notice")).to_contain_text("bearer token")
    page.fill("#token", "not-the-token-but-long-enough")
    page.click("#use-token")
    expect(page.locator("#notice")).to_contain_text("The bearer token is not valid")


def _drop(tab: PageUnderTest, path: Path) -> None:
    """Drop a file on the drop zone as a browser does (a DataTransfer with a File)."""
    tab.page.evaluate(
        """([name, data]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name));
        const zone = document.getElementById("drop-zone");
        for (const type of ["dragenter", "dragover", "drop"]) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true,
                                                    cancelable: true}));
        }
    }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def test_dropped_before_the_token_then_another_layer(tab: PageUnderTest) -> None:
    page = tab.page
    expect(page.locator("#notice")).to_contain_text("bearer token")
    name = "phantom_opacity.png"
    _drop(tab, EXAMPLES / name)
    expect(page.locator("#status")).to_contain_text("once the models are listed")
    page.locator("#token").fill(TOKEN)
    page.locator("#token").press("Enter")
    tab.wait_explained(name, 1, "opacity")
    tab.set_opacity(100)
    assert peak_in_boxes(_heat_from_pixels(tab.canvas(name)), _boxes(name, "opacity"), 8.0)
    # Another layer: every figure says which, and the map changes.
    before = tab.canvas(name)
    layers = page.locator("#layer option").evaluate_all(
        "options => options.map(o => [o.value, o.selected])"
    )
    other = next(value for value, selected in layers if not selected)
    page.select_option("#layer", other)
    expect(tab.card(name).locator(".figure figcaption")).to_contain_text(  # type: ignore[attr-defined]
        f"layer {other}"
    )
    tab.wait_explained(name, 1, "opacity")
    after = tab.canvas(name)
    assert after.std() > 20 and not np.array_equal(before, after)


def test_a_multiframe_dicom_has_a_frame_chooser(tab: PageUnderTest) -> None:
    import pydicom

    path = pydicom_file("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array  # (2, rows, columns, 3)
    tab.connect()
    tab.page.set_input_files("#files", str(path))
    card = tab.card(path.name)
    expect(card.locator(".figure")).to_have_count(1)  # type: ignore[attr-defined]
    chooser = card.locator(".frame")  # type: ignore[attr-defined]
    expect(chooser).to_be_visible()
    expect(card.locator(".frame-count")).to_have_text("of 2")  # type: ignore[attr-defined]
    tab.set_opacity(0)
    assert np.array_equal(tab.canvas(path.name), frames[0])
    chooser.fill("2")
    chooser.press("Enter")
    expect(card.locator("dl.dicom")).to_contain_text("frame 2 of 2")  # type: ignore[attr-defined]
    expect(card).not_to_have_attribute("aria-busy", "true")  # type: ignore[arg-type]
    tab.page.evaluate("() => new Promise(requestAnimationFrame)")
    assert np.array_equal(tab.canvas(path.name), frames[1])
    assert not tab.axe_violations(), tab.axe_violations()


def test_buttons_wait_until_they_can_act(tab: PageUnderTest) -> None:
    page = tab.page
    expect(page.locator("#use-token")).to_be_disabled()
    expect(page.locator("#explain")).to_be_disabled()
    page.fill("#token", TOKEN)
    expect(page.locator("#use-token")).to_be_enabled()
    page.click("#use-token")
    expect(page.locator("#layer option")).not_to_have_count(0)
    expect(page.locator("#explain")).to_be_disabled()  # nothing to explain yet
    page.set_input_files("#files", str(EXAMPLES / "phantom_nodule.png"))
    tab.wait_explained("phantom_nodule.png", 1, "nodule")
    expect(page.locator("#explain")).to_be_enabled()


def test_each_card_shows_its_progress_and_large_pictures(tab: PageUnderTest) -> None:
    """Reading, uploading, computing, rendering, then the time taken; the overlay at least
    512 px wide at 1280 px, beside the image as the model read it; long names in tooltips."""
    page = tab.page
    tab.connect()
    for select in ("#model", "#layer", "#target"):
        title = page.locator(select).get_attribute("title")
        chosen = page.locator(select).evaluate("s => s.options[s.selectedIndex].textContent")
        assert title == chosen and title
    name = "phantom_mass_tube.png"
    page.set_input_files("#files", str(EXAMPLES / name))
    tab.wait_explained(name, 1, "mass")
    card = tab.card(name)
    expect(card.locator(".card-progress")).to_contain_text("Explained in")  # type: ignore[attr-defined]
    stages = card.get_attribute("data-stages").split()  # type: ignore[attr-defined]
    assert stages == ["reading", "upload", "computing", "rendering"], stages
    overlay = card.locator(".figure canvas").first.bounding_box()  # type: ignore[attr-defined]
    original = card.locator(".original canvas").bounding_box()  # type: ignore[attr-defined]
    assert overlay["width"] >= 512 and original["width"] >= 512
    assert abs(overlay["y"] - original["y"]) < 1 and original["x"] < overlay["x"]
    tab.set_opacity(0)
    assert np.array_equal(tab.canvas(name), np.asarray(Image.open(EXAMPLES / name).convert("RGB")))
    assert not tab.axe_violations(), tab.axe_violations()


def test_a_dicom_result_downloads_as_dicom(tab: PageUnderTest) -> None:
    import pydicom

    tab.connect()
    name = "phantom_nodule.dcm"
    tab.page.set_input_files("#files", str(EXAMPLES / name))
    tab.wait_explained(name, 1, "nodule")
    source = pydicom.dcmread(EXAMPLES / name)
    made = {}
    for kind, suffix in (("sc", ""), ("seg", "-seg"), ("sr", "-report")):
        button = tab.card(name).locator(f'.download-dicom[data-kind="{kind}"]')  # type: ignore[attr-defined]
        expect(button).to_be_visible()
        with tab.page.expect_download() as download:
            button.click()
        assert download.value.suggested_filename == f"phantom_nodule-gradcam-nodule{suffix}.dcm"
        made[kind] = pydicom.dcmread(download.value.path())
        # Each in a new series of the source's study, referencing the source.
        assert made[kind].StudyInstanceUID == source.StudyInstanceUID
        assert made[kind].SeriesInstanceUID != source.SeriesInstanceUID
        assert source.SOPInstanceUID in str(made[kind])
    assert made["sc"].SOPClassUID.name.startswith("Secondary Capture")
    assert (made["sc"].Rows, made["sc"].Columns) == (
        FINDINGS[name]["height"],
        FINDINGS[name]["width"],
    )
    assert made["seg"].SOPClassUID.name == "Segmentation Storage"
    assert made["seg"].SegmentSequence[0].SegmentLabel == "nodule"
    assert made["sr"].SOPClassUID.name == "Comprehensive 3D SR Storage"
    assert "nodule" in str(made["sr"].ContentSequence)
    assert not tab.card(name).locator(".card-error").inner_text()  # type: ignore[attr-defined]
    # A PNG has no DICOM to derive from: no such buttons.
    tab.page.set_input_files("#files", str(EXAMPLES / "phantom_nodule.png"))
    tab.wait_explained("phantom_nodule.png", 1, "nodule")
    for button in tab.card("phantom_nodule.png").locator(".download-dicom").all():  # type: ignore[attr-defined]
        expect(button).to_be_hidden()


SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_the_page_looks_as_it_did(
    live: LiveServer, browser: object, width: int, height: int
) -> None:
    """The page at a desktop and a phone viewport, against a stored picture (moving text
    masked). GRADCAM_UPDATE_SCREENSHOTS=1 stores new references after a deliberate change."""
    tab = PageUnderTest(browser, live.url + "/", viewport=(width, height))
    try:
        tab.connect()
        name = "phantom_mass_tube.png"
        tab.page.set_input_files("#files", str(EXAMPLES / name))
        tab.wait_explained(name, 1, "mass")
        tab.page.locator("#files").blur()
        # The card at the top of the window: the results are what this picture is about.
        tab.card(name).evaluate("card => card.scrollIntoView({block: 'start'})")  # type: ignore[attr-defined]
        tab.page.evaluate("() => new Promise(requestAnimationFrame)")
        shot = tab.page.screenshot(
            mask=[tab.page.locator("#status"), tab.page.locator(".card-progress")],
            animations="disabled",
            caret="hide",
        )
        assert not tab.errors, tab.errors
    finally:
        tab.close()
    _compare_with_reference(shot, f"page-{width}x{height}.png")


def _compare_with_reference(shot: bytes, name: str) -> None:
    taken = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)
    reference_path = SCREENSHOTS / name
    if os.environ.get("GRADCAM_UPDATE_SCREENSHOTS") == "1" or not reference_path.exists():
        reference_path.parent.mkdir(exist_ok=True)
        Image.fromarray(taken.astype(np.uint8)).save(reference_path, optimize=True)
        if os.environ.get("GRADCAM_UPDATE_SCREENSHOTS") != "1":
            pytest.fail(f"no reference: stored {reference_path}; look at it and commit it")
    reference = np.asarray(Image.open(reference_path).convert("RGB"), dtype=np.int16)
    assert taken.shape == reference.shape
    # Compared at a quarter of the size: another machine's font hinting or anti-aliasing
    # moves single pixels, a changed layout moves whole blocks.
    difference = np.abs(_quarter(taken) - _quarter(reference)).max(axis=2)
    changed = (difference > 32).mean()
    assert changed < 0.01, f"{changed:.2%} of the page changed (see {reference_path})"


def _quarter(pixels: np.ndarray) -> np.ndarray:
    height, width = (pixels.shape[0] // 4) * 4, (pixels.shape[1] // 4) * 4
    blocks = pixels[:height, :width].reshape(height // 4, 4, width // 4, 4, 3)
    return blocks.mean(axis=(1, 3))


# What does not fit in its box, measured in the browser: a list's entries (the text of
# each option in the list's font, against the list's width less its padding and arrow),
# and any other element whose text overflows its box.
_CUT_TEXTS = """selectors => {
    const context = document.createElement("canvas").getContext("2d");
    const cut = [];
    for (const element of document.querySelectorAll(selectors)) {
        if (element.tagName !== "SELECT") {
            if (element.scrollWidth > element.clientWidth) cut.push(element.textContent);
            continue;
        }
        const style = getComputedStyle(element);
        context.font = style.font;
        const room = element.clientWidth - parseFloat(style.paddingLeft)
            - parseFloat(style.paddingRight) - 24;  // the drop-down arrow
        for (const option of element.options) {
            if (context.measureText(option.textContent).width > room) {
                cut.push(option.textContent);
            }
        }
    }
    return cut;
}"""

# The token box's inner width in characters of its font ("0", as CSS's ch).
_TOKEN_CHARACTERS = """input => {
    const style = getComputedStyle(input);
    const context = document.createElement("canvas").getContext("2d");
    context.font = style.font;
    const inner = input.clientWidth - parseFloat(style.paddingLeft)
        - parseFloat(style.paddingRight);
    return inner / context.measureText("0").width;
}"""


def _layers(live: LiveServer) -> dict:
    answer = requests.get(
        f"{live.url}/v1/models/phantom/layers",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert answer.status_code == 200
    layers: dict = answer.json()
    return layers


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_the_first_view_invites(live: LiveServer, browser: object, width: int, height: int) -> None:
    """Before any image: whole names in every list, a token box a token fits in, the
    layers grouped with the default first, the examples to try, and no empty half."""
    tab = PageUnderTest(browser, live.url + "/", viewport=(width, height))
    try:
        page = tab.page
        token_characters = page.locator("#token").evaluate(_TOKEN_CHARACTERS)
        assert token_characters >= (32 if width >= 1100 else 24), token_characters
        tab.connect()
        cut = page.evaluate(
            _CUT_TEXTS, "#model, #layer, #target, #model-info, #layer-info, .example-name"
        )
        assert not cut, cut
        expect(page.locator("#model-warning")).to_be_hidden()  # the demo model is trained
        expect(page.locator("#model-info")).to_contain_text("service.demo.model:phantom_net")

        # The default layer first, with its shape; the others once each, in groups.
        layers = _layers(live)
        default = next(x for x in layers["layers"] if x["name"] == layers["default_layer"])
        first = page.locator("#layer option").first
        shape = f"{default['channels']}×{default['height']}×{default['width']}"
        expect(first).to_have_text(f"{default['name']} — {shape} (default)")
        assert page.locator("#layer").input_value() == default["name"]
        groups = page.locator("#layer optgroup").evaluate_all(
            "groups => groups.map(g => [g.label, [...g.children].map(o => o.value)])"
        )
        assert groups[0] == ["Default", [default["name"]]]
        assert 3 <= len(groups) <= 12, groups
        listed = [name for _, names in groups for name in names]
        assert sorted(listed) == sorted(x["name"] for x in layers["layers"])
        expect(page.locator("#layer-info")).to_contain_text(f"{default['name']}: ")

        # The examples, in the first view on a desktop, and where the results will come.
        examples = page.locator(".example")
        shipped = sorted(p.name for p in EXAMPLES.glob("phantom_*.png"))
        assert examples.evaluate_all("buttons => buttons.map(b => b.dataset.name)") == [
            *shipped,
            "phantom_nodule.dcm",
        ]
        page.wait_for_function(
            "() => [...document.querySelectorAll('img.example-picture')]"
            ".every(image => image.complete && image.naturalWidth > 0)"
        )
        if width >= 1100:
            box = page.locator("#example-list").bounding_box()
            assert box is not None and box["y"] + box["height"] <= height, box
        expect(page.locator("#results-empty")).to_be_visible()
        assert not tab.axe_violations(), tab.axe_violations()
        page.locator("#use-token").blur()
        shot = page.screenshot(mask=[page.locator("#status")], animations="disabled", caret="hide")
        assert not tab.errors, tab.errors
    finally:
        tab.close()
    _compare_with_reference(shot, f"first-view-{width}x{height}.png")


def test_an_example_is_explained_with_one_click(tab: PageUnderTest, tmp_path: Path) -> None:
    page = tab.page
    tab.connect()
    name = "phantom_mass_tube.png"
    button = page.locator(f'.example[data-name="{name}"]')
    expect(button).to_have_accessible_name(f"Explain the example {name} (mass, tube)")
    button.click()
    tab.wait_explained(name, 1, "mass")
    expect(page.locator("#results-empty")).to_be_hidden()
    expect(tab.card(name).locator(".figure canvas")).to_be_in_viewport()  # type: ignore[attr-defined]
    tab.set_opacity(100)
    clicked = tab.canvas(name)
    assert clicked.std() > 20, "the canvas is blank"
    assert peak_in_boxes(_heat_from_pixels(clicked), _boxes(name, "mass"), 8.0)
    # The same as the file chosen by hand: one path from the file on.
    chosen = tmp_path / "chosen.png"
    chosen.write_bytes((EXAMPLES / name).read_bytes())
    page.set_input_files("#files", str(chosen))
    tab.wait_explained("chosen.png", 1, "mass")
    assert np.array_equal(tab.canvas("chosen.png"), clicked)
    # The DICOM example, with the keyboard: shown as a viewer would, with its fields.
    dicom = page.locator('.example[data-name="phantom_nodule.dcm"]')
    dicom.focus()
    page.keyboard.press("Enter")
    tab.wait_explained("phantom_nodule.dcm", 1, "nodule")
    expect(tab.card("phantom_nodule.dcm").locator(".dicom")).to_contain_text("MONOCHROME1")  # type: ignore[attr-defined]


def test_a_model_with_random_weights_says_so(tab: PageUnderTest) -> None:
    """The listing's ``random_weights`` (a missing field is false) puts a warning by the
    model list: its answers mean nothing."""
    page = tab.page

    def flagged(route: Any) -> None:
        answer = route.fetch()
        listing = answer.json()
        for model in listing["models"]:
            model["random_weights"] = True
        route.fulfill(response=answer, json=listing)

    page.route("**/v1/models", flagged)
    tab.connect()
    warning = page.locator("#model-warning")
    expect(warning).to_be_visible()
    expect(warning).to_have_text("The model phantom has random weights: its answers mean nothing.")
    expect(page.locator("#model option").first).to_have_text("phantom (random weights)")
    assert not page.evaluate(_CUT_TEXTS, "#model, #model-warning")
    assert not tab.axe_violations(), tab.axe_violations()


# --- volumes: a server of its own, with a 3-D model (tests/volume_models.py) -------------


@pytest.fixture(scope="module")
def volume_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models file (ct3d, the default, and the 2-D phantom), ct.nii.gz, and the same
    voxels as the files of a DICOM series in series/."""
    pytest.importorskip("nibabel")
    pytest.importorskip("monai.networks.nets")
    from tests.dicom_series import write_ct_series
    from tests.volume_models import DICOM_ORIGIN, DICOM_SPACING, ct_phantom, write_models

    folder = tmp_path_factory.mktemp("page-volumes")
    write_models(folder)
    (folder / "series").mkdir()
    files = write_ct_series(ct_phantom(), DICOM_SPACING, DICOM_ORIGIN, signed=True)
    for number, data in enumerate(files):
        (folder / "series" / f"slice{number:03d}.dcm").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def volume_live(module_live_server: ServerFactory, volume_folder: Path) -> LiveServer:
    return module_live_server(models_file=volume_folder / "models.toml")


@pytest.fixture
def volume_tab(volume_live: LiveServer, browser: object) -> Iterator[PageUnderTest]:
    opened = PageUnderTest(browser, volume_live.url + "/", viewport=(1280, 800))
    yield opened
    opened.close()
    assert not opened.errors, opened.errors
    assert "Traceback" not in volume_live.read_log()


_VIEWS = ("axial", "coronal", "sagittal")
# The RAS axis each view cuts across, and the axes of its rows and columns (both drawn
# from their high end), as service/imaging/volume_pictures.py shows them.
_ACROSS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


def _half_up(value: float) -> int:
    """JavaScript's Math.round."""
    return int(np.floor(value + 0.5))


def _view_pixels(tab: PageUnderTest, card: Any, view: str) -> np.ndarray:
    canvas = card.locator(f'.figure.volume .slice-view[data-view="{view}"] canvas')
    data_url = canvas.evaluate("canvas => canvas.toDataURL('image/png')")
    png = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _wait_volume(tab: PageUnderTest, name: str, target: str) -> Any:
    card = tab.card(name)
    expect(card.locator(".figure.volume")).to_have_count(1)
    expect(card.locator(".figure.volume figcaption")).to_contain_text(f"· {target} (")
    expect(card).not_to_have_attribute("aria-busy", "true")
    expect(card.locator(".figure.volume .slice-view canvas")).to_have_count(3)
    tab.page.evaluate("() => new Promise(requestAnimationFrame)")
    return card


def _service_answer(live: LiveServer, images: list[Any], heatmap: dict[str, str]) -> Any:
    answer = requests.post(
        f"{live.url}/v1/explain",
        json={"images": images, "targets": ["nodule"], "heatmap": heatmap},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text[:400]
    return answer.json()["results"][0]


def test_a_nifti_volume_is_shown_in_three_views_through_the_peak(
    volume_tab: PageUnderTest, volume_live: LiveServer, volume_folder: Path
) -> None:
    """Upload ct.nii.gz to the 3-D model: three views drawn (the body, the map over it),
    each slider at the map's peak and the cross there, the slices turned and scaled as
    the service's own picture of three slices, and a slider that moves its slice."""
    page = volume_tab.page
    expect(page.locator("#model")).to_have_value("ct3d")
    expect(page.locator("#model-info")).to_contain_text("48×48×32 voxels")
    expect(page.locator('label[for="files"]')).to_have_text("Choose a volume")
    page.select_option("#target", label="1: nodule")
    nifti = volume_folder / "ct.nii.gz"
    page.set_input_files("#files", str(nifti))
    card = _wait_volume(volume_tab, "ct.nii.gz", "nodule")
    expect(card.locator(".predictions .prediction")).to_have_count(2)

    # The map's peak as the API gives it (the input's grid is RAS: its voxel is x, y, z).
    result = _service_answer(
        volume_live, [encode(nifti.read_bytes())], {"format": "nifti", "size": "input"}
    )
    peak = result["explanations"][0]["heatmap"]["peak"]["voxel"]
    shape = result["geometry"]["input_shape"]
    spacing = result["geometry"]["input_spacing"]
    assert card.locator(".figure.volume").get_attribute("data-peak") == ",".join(map(str, peak))
    reference = _service_picture(volume_live, nifti)
    left = 0
    for view in _VIEWS:
        across, rows, columns = _ACROSS[view]
        box = card.locator(f'.figure.volume .slice-view[data-view="{view}"]')
        assert box.locator(".slice").input_value() == str(peak[across])
        expect(box.locator("output")).to_have_text(f"{peak[across] + 1} of {shape[across]}")
        drawn = _view_pixels(volume_tab, card, view)
        assert drawn.std() > 20, f"the {view} view is blank"
        # Voxels keep their size in mm: the view's sides are the slice's in mm.
        height, width = drawn.shape[:2]
        expected = (shape[columns] * spacing[columns]) / (shape[rows] * spacing[rows])
        assert abs(width / height - expected) < 0.02 * expected, (view, width, height)
        # The cross at the peak's voxel centre, open in its middle.
        row = _half_up((shape[rows] - 1 - peak[rows] + 0.5) * height / shape[rows] - 0.5)
        column = _half_up((shape[columns] - 1 - peak[columns] + 0.5) * width / shape[columns] - 0.5)
        cross = box.locator("canvas").get_attribute("data-cross")
        assert cross == f"{row},{column}", (view, cross)
        assert (drawn[row, column + 4] == 255).all() and (drawn[row + 4, column] == 255).all()
        # The service's own panel of this view: the same slice, turned the same way.
        panel = reference[:height, left : left + width].astype(np.float64)
        left += width + 4
        mask = np.ones(panel.shape[:2], bool)
        mask[:14, :60] = False  # the service writes the view's name there
        correlation = np.corrcoef(panel[mask].ravel(), drawn[mask].astype(np.float64).ravel())
        assert correlation[0, 1] > 0.95, (view, correlation[0, 1])
    # The picture of the views at the peak (compared at the end, once all is checked).
    card.evaluate("card => card.scrollIntoView({block: 'start'})")
    page.evaluate("() => new Promise(requestAnimationFrame)")
    shot = page.screenshot(
        mask=[page.locator("#status"), page.locator(".card-progress")],
        animations="disabled",
        caret="hide",
    )
    screenshot = os.environ.get("GRADCAM_VOLUME_SCREENSHOT")
    if screenshot:  # docs/web-page-volume.png: the card alone
        card.screenshot(path=screenshot, animations="disabled", caret="hide")

    # At opacity 0 the volume alone: the body (soft tissue) bright, the air around it black.
    volume_tab.set_opacity(0)
    axial = _view_pixels(volume_tab, card, "axial")[..., 0]
    assert (axial < 10).mean() > 0.1 and (axial > 150).mean() > 0.3
    volume_tab.set_opacity(60)
    # The axial slider moves the axial slice, and the cross in the two other views.
    before = {view: _view_pixels(volume_tab, card, view) for view in _VIEWS}
    slider = card.locator('.slice-view[data-view="axial"] .slice')
    slider.focus()
    slider.press("Home")
    expect(card.locator('.slice-view[data-view="axial"] output')).to_have_text(f"1 of {shape[2]}")
    after = {view: _view_pixels(volume_tab, card, view) for view in _VIEWS}
    assert all(not np.array_equal(before[view], after[view]) for view in _VIEWS)
    assert not volume_tab.axe_violations(), volume_tab.axe_violations()
    _compare_with_reference(shot, "volume-1280x800.png")


def _service_picture(live: LiveServer, nifti: Path) -> np.ndarray:
    """The service's three slices through the peak (overlay at 60%, on the input's grid)."""
    result = _service_answer(
        live, [encode(nifti.read_bytes())], {"format": "overlay", "size": "input"}
    )
    data = base64.b64decode(result["explanations"][0]["heatmap"]["data"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_dicom_series_is_one_volume_and_an_image_is_refused(
    volume_tab: PageUnderTest, volume_folder: Path
) -> None:
    """The files of a series, chosen together, are one card and one volume: the same map
    as the NIfTI file of the same voxels. A PNG gets the API's volume_required."""
    page = volume_tab.page
    expect(page.locator("#model")).to_have_value("ct3d")
    page.select_option("#target", label="1: nodule")
    files = sorted((volume_folder / "series").iterdir())
    page.set_input_files("#files", [str(path) for path in files])
    name = f"{files[0].name} and {len(files) - 1} more (one series)"
    expect(page.locator(".card")).to_have_count(1)
    card = _wait_volume(volume_tab, name, "nodule")
    for view in _VIEWS:
        assert _view_pixels(volume_tab, card, view).std() > 20, view
    from_series = card.locator(".figure.volume").get_attribute("data-peak")
    page.set_input_files("#files", str(volume_folder / "ct.nii.gz"))
    from_file = _wait_volume(volume_tab, "ct.nii.gz", "nodule")
    assert from_file.locator(".figure.volume").get_attribute("data-peak") == from_series
    # A 2-D image for the volume model: the API's message and code, on its card.
    png = EXAMPLES / "phantom_nodule.png"
    page.set_input_files("#files", str(png))
    error = volume_tab.card(png.name).locator(".card-error")
    expect(error).to_contain_text("Model 'ct3d' explains volumes: phantom_nodule.png is no volume")
    expect(error).to_contain_text("(volume_required)")
    # The 2-D model: the page as it always was (the chooser asks for images again).
    page.select_option("#model", "phantom")
    expect(page.locator('label[for="files"]')).to_have_text("Choose images")
    expect(page.locator("#model-info")).to_contain_text("input 128×128")
