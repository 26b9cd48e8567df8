"""deploy/ohif/serve.py, in-process against a fake OHIF ``dist/`` and a fake DICOMweb
server: files with their types, the single-page fallback, no path out of ``dist/``, the
configuration from deploy/ohif/, DICOMweb passed through (path, query, body, the
browser's Host, chunked answers) and a server that is down. What it refuses, and its
limits, in front of a real Orthanc: ``test_ohif_front_ends.py``; the real viewer on a
real Orthanc: ``test_ohif.py``."""

from __future__ import annotations

import http.client
import http.server
import importlib.util
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO, free_port

OHIF = REPO / "deploy" / "ohif"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ohif_serve", OHIF / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ohif_serve"] = module
    spec.loader.exec_module(module)
    return module


serve = _load()


@dataclass
class Seen:
    """What the fake DICOMweb server was sent."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


class _FakeDicomWeb(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: Seen

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.requests.append((self.command, self.path, dict(self.headers.items()), body))
        if self.path.endswith("/metadata"):
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"[", b'{"a": 1}', b"]"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        data = b'[{"00080060": {"vr": "CS", "Value": ["OT"]}}]'
        self.send_response(200 if self.command == "GET" else 202)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Running:
    port: int
    seen: Seen
    config: Path


def _start(server: http.server.HTTPServer) -> threading.Thread:
    # A short poll: shutdown() waits for it.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>OHIF</title>")
    (dist / "app.bundle.js").write_text("console.log('app');")
    (dist / "codec.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "app-config.js").write_text("window.config = {name: 'the package default'};")
    (tmp_path / "secret.txt").write_text("outside dist")
    (dist / "link.txt").symlink_to(tmp_path / "secret.txt")
    seen = Seen()
    upstream = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Fake", (_FakeDicomWeb,), {"seen": seen})
    )
    _start(upstream)
    config = OHIF / "app-config.js"
    viewer = serve.make_server(
        dist,
        config,
        f"http://127.0.0.1:{upstream.server_address[1]}/dicom-web",
        port=free_port(),
        allowed_hosts=("viewer.example:3000",),
    )
    _start(viewer)
    yield Running(viewer.server_address[1], seen, config)
    viewer.shutdown()
    upstream.shutdown()
    viewer.server_close()
    upstream.server_close()


def _get(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    host: str = "",
    kind: str = "",
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host} if host else {}
    if kind:
        headers["Content-Type"] = kind
    try:
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def test_files_have_their_types_and_the_application_its_routes(running: Running) -> None:
    status, headers, body = _get(running.port, "/app.bundle.js")
    assert (status, headers["Content-Type"], body) == (
        200,
        "text/javascript",
        b"console.log('app');",
    )
    status, headers, _ = _get(running.port, "/codec.wasm")
    assert (status, headers["Content-Type"]) == (200, "application/wasm")
    # OHIF's own routes are the application; a missing asset is not.
    for route in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/viewer/dicomweb"):
        status, headers, body = _get(running.port, route)
        assert (status, body) == (200, b"<!doctype html><title>OHIF</title>"), route
        assert headers["Cache-Control"] == "no-cache"
    assert _get(running.port, "/1234.bundle.js")[0] == 404
    status, _, _ = _get(running.port, "/index.html", method="HEAD")
    assert status == 200


def test_nothing_outside_dist_is_served(running: Running) -> None:
    # A dot segment is not a normalised path: refused before a file is looked for.
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/assets/../../secret.txt"):
        status, _, body = _get(running.port, path)
        assert (status, body) == (400, b"not a normalised path\n"), path
    # A link in dist/ to a file outside it is no file of dist/.
    status, _, body = _get(running.port, "/link.txt")
    assert status == 404 and b"outside dist" not in body


def test_the_configuration_is_deploys_not_the_packages(running: Running) -> None:
    status, headers, body = _get(running.port, "/app-config.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript"
    assert body == running.config.read_bytes()
    assert b"qidoRoot: '/dicom-web'" in body


def test_dicomweb_is_passed_through_with_the_browsers_host(running: Running) -> None:
    path = "/dicom-web/studies?PatientName=PHANTOM*&includefield=00081030"
    status, headers, body = _get(running.port, path, host="viewer.example:3000")
    assert status == 200 and headers["Content-Type"] == "application/dicom+json"
    assert b'"OT"' in body
    method, sent_path, sent_headers, _ = running.seen.requests[-1]
    assert (method, sent_path) == ("GET", path)
    # Orthanc writes URLs for the Host it was asked on: the viewer's, not its own.
    assert sent_headers["Host"] == "viewer.example:3000"
    # An answer in chunks goes on in chunks, as they come.
    status, headers, body = _get(running.port, "/dicom-web/studies/1.2/series/3.4/metadata")
    assert (status, body) == (200, b'[{"a": 1}]')
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    # STOW-RS goes through with its body; nothing else takes a POST.
    stow = 'multipart/related; type="application/dicom"; boundary=x'
    status, _, _ = _get(running.port, "/dicom-web/studies", "POST", b"multipart", kind=stow)
    assert status == 202 and running.seen.requests[-1][3] == b"multipart"
    assert running.seen.requests[-1][2]["Content-Type"] == stow
    before = len(running.seen.requests)
    assert _get(running.port, "/dicom-web/studies", "POST", b"x", kind="text/plain")[0] == 415
    assert _get(running.port, "/viewer", method="POST", body=b"x")[0] == 405
    assert len(running.seen.requests) == before
    # A path that only starts like the prefix is a file path, not DICOMweb.
    before = len(running.seen.requests)
    assert _get(running.port, "/dicom-webby.js")[0] == 404
    assert len(running.seen.requests) == before


def test_a_dicomweb_server_that_is_down_is_a_502(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("ohif")
    viewer = serve.make_server(
        tmp_path, OHIF / "app-config.js", f"http://127.0.0.1:{free_port()}/dicom-web", port=0
    )
    _start(viewer)
    try:
        status, _, body = _get(viewer.server_address[1], "/dicom-web/studies")
        assert status == 502 and b"did not answer" in body
    finally:
        viewer.shutdown()
        viewer.server_close()


def test_bad_arguments_stop_it_with_a_message(tmp_path: Path) -> None:
    config = OHIF / "app-config.js"
    with pytest.raises(SystemExit, match=r"no index\.html"):
        serve.make_server(tmp_path, config, "http://127.0.0.1:8042/dicom-web", port=0)
    (tmp_path / "index.html").write_text("ohif")
    with pytest.raises(SystemExit, match="an http:// URL"):
        serve.make_server(tmp_path, config, "https://pacs/dicom-web", port=0)
    with pytest.raises(SystemExit, match="no such file"):
        serve.make_server(tmp_path, tmp_path / "none.js", "http://pacs/dicom-web", port=0)
