"""The web page at ``/``: drop images, see the predictions and the heatmaps over them.

Plain HTML, CSS and JavaScript shipped in the package (``page/``): no build step,
no CDN, so it works offline and behind a hospital firewall. The page calls only
the public API (``v1/models``, ``v1/explain``), with relative URLs so that it also
works behind a proxy that serves the service under a path prefix.

The page offers the repository's example images (``examples/``: synthetic
phantoms, no patient data) to try with one click, under ``/page/examples/<name>``:
only the phantom files found in that folder (``GRADCAM_EXAMPLES_DIR``: the Docker
image's copy), never a path. An installed package without one offers none.

The files are open without a token (they hold no data; the page sends the
token the user types with each API call) and are served with a strict Content
Security Policy: scripts and styles from this origin only, and ``connect-src
'self'``, so the page cannot send an image anywhere but to this service.
``GRADCAM_WEB_PAGE=false`` turns it off.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from pathlib import Path

import orjson
from flask import Blueprint, Response, request
from werkzeug.exceptions import NotFound

from service.contract.terms import METHODS
from service.imaging.render import COLORMAP
from service.server.routes import current_settings

# Open without a token (security.AccessPolicy): the page and its own files.
PAGE_PATH = "/"
ASSETS_PREFIX = "/page/"

_ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
EXAMPLES_PREFIX = ASSETS_PREFIX + "examples/"
# The repository's examples, beside the package in a source checkout (and an editable
# install); the phantom PNGs and the DICOM file, with the findings each one holds.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
_EXAMPLE_TYPES = {".png": "image/png", ".dcm": "application/dicom"}
# Names the page shows for the API's methods.
_METHOD_TITLES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "Layer-CAM",
    "hirescam": "HiResCAM",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load (ETag): a new release is seen at once.
    "Cache-Control": "no-cache",
}

page = Blueprint("page", __name__)


def _read(name: str) -> bytes:
    return resources.files("service.server").joinpath("page", name).read_bytes()


@cache
def _index(examples: Path) -> bytes:
    """index.html with the page's configuration: the colour map heatmaps are drawn
    with (the one ``png`` and ``overlay`` use) and the methods, from their one home."""
    config = {
        "colormap": COLORMAP.tolist(),
        "methods": [[name, _METHOD_TITLES.get(name, name)] for name in METHODS],
        "examples": [
            {"name": name, "findings": findings} for name, findings in _examples(examples).items()
        ],
    }
    return _read("index.html").replace(b"{{CONFIG}}", orjson.dumps(config))


def _examples_dir() -> Path:
    """``GRADCAM_EXAMPLES_DIR`` (the Docker image's /app/examples), else the checkout's."""
    chosen = current_settings().examples_dir
    return Path(chosen) if chosen else EXAMPLES_DIR


@cache
def _examples(folder: Path) -> dict[str, list[str]]:
    """The example files in ``folder`` the page offers, by name, each with the kinds of
    finding it holds (``findings.json``); empty where the folder is not there."""
    if not folder.is_dir():
        return {}
    findings_file = folder / "findings.json"
    known = orjson.loads(findings_file.read_bytes()) if findings_file.is_file() else {}
    found = {}
    # The PNGs first, then the DICOM file.
    for path in sorted(folder.iterdir(), key=lambda p: (p.suffix == ".dcm", p.name)):
        if path.name.startswith("phantom_") and path.suffix in _EXAMPLE_TYPES and path.is_file():
            kinds = [finding["kind"] for finding in known.get(path.name, {}).get("findings", [])]
            found[path.name] = list(dict.fromkeys(kinds))
    return found


@cache
def _asset(name: str) -> bytes:
    return _read(name)


def _send(body: bytes, mimetype: str) -> Response:
    response = Response(body, mimetype=mimetype, headers=_HEADERS)
    response.set_etag(hashlib.sha256(body).hexdigest()[:32])
    response.make_conditional(request)  # 304 for a page the browser already has
    return response


@page.get(PAGE_PATH)
def index_view() -> Response:
    return _send(_index(_examples_dir()), "text/html")


@page.get(ASSETS_PREFIX + "<name>")
def asset_view(name: str) -> Response:
    if name not in _ASSETS:
        raise NotFound()
    return _send(_asset(name), _ASSETS[name])


@page.get(EXAMPLES_PREFIX + "<name>")
def example_view(name: str) -> Response:
    """One of the examples the page offers, by its name alone: anything else is 404."""
    folder = _examples_dir()
    if name not in _examples(folder):
        raise NotFound()
    body = (folder / name).read_bytes()
    return _send(body, _EXAMPLE_TYPES[Path(name).suffix])
