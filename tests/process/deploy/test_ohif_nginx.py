"""deploy/ohif/nginx.conf in Debian's nginx, on a stand-in Orthanc: OHIF's files, its
configuration uncached, DICOMweb passed with its path, query and the browser's Host, a name
it does not serve refused (what each front end refuses before a real Orthanc:
tests/process/pacs/test_ohif_front_ends.py). running_ohif_nginx is the nginx those tests run
too."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import requests

from tests.helpers import answering, free_port, missing_tool, wait_until
from tests.unit.deploy.test_deploy import DEPLOY


def _nginx() -> str:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():  # not on a user's PATH
        found = "/usr/sbin/nginx"
    if found is None:
        missing_tool("nginx", "nginx")
    return found


class _StandInOrthanc(http.server.BaseHTTPRequestHandler):
    """Answers any GET with a DICOM JSON list, keeping the path and Host it was asked."""

    seen: ClassVar[list[tuple[str, str]]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers["Host"]))
        data = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def running_ohif_nginx(folder: Path, dist: Path, orthanc: str, server_names: str) -> Iterator[str]:
    """deploy/ohif/nginx.conf run by Debian's nginx, with what the container gives it
    changed for this machine: its port, OHIF's files (``dist``), Orthanc's address
    (``orthanc``, ``http://host:port``) and the names it serves (``server_names``, which
    the image's entrypoint puts in from OHIF_SERVER_NAMES); stopped by its PID. Yields
    its URL."""
    nginx = _nginx()
    port = free_port()
    text = (DEPLOY / "ohif/nginx.conf").read_text()
    for old, new, count in (
        ("listen 8080", f"listen 127.0.0.1:{port}", 2),  # OHIF's server and the refusing one
        ("root /usr/share/nginx/html;", f"root {dist};", 1),
        ("http://orthanc:8042;", f"{orthanc};", 1),
        ("${OHIF_SERVER_NAMES}", server_names, 1),
    ):
        assert text.count(old) == count, old
        text = text.replace(old, new)
    # What the entrypoint's envsubst leaves (NGINX_ENVSUBST_FILTER: OHIF_ names only).
    assert "${OHIF_" not in text
    (folder / "default.conf").write_text(text)
    temp = {kind: folder / kind for kind in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    (folder / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log;\nevents {{ worker_connections 64; }}\n"
        "http {\n  include /etc/nginx/mime.types;\n  access_log off;\n"
        f"  client_body_temp_path {temp['body']};\n  proxy_temp_path {temp['proxy']};\n"
        f"  fastcgi_temp_path {temp['fastcgi']};\n  uwsgi_temp_path {temp['uwsgi']};\n"
        f"  scgi_temp_path {temp['scgi']};\n  include {folder}/default.conf;\n}}\n"
    )
    checked = subprocess.run(
        [nginx, "-t", "-p", str(folder), "-c", str(folder / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(
        [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            answering(f"{url}/index.html", process),
            20,
            "nginx answering",
            detail=(folder / "error.log").read_text,
        )
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def test_ohifs_nginx_serves_the_viewer_and_passes_dicomweb_to_orthanc(tmp_path: Path) -> None:
    """The wiring, on a stand-in Orthanc (what each front end refuses, and passes to a
    real Orthanc, is in test_ohif_front_ends.py)."""
    dist = tmp_path / "html"
    dist.mkdir()
    (dist / "index.html").write_text("<title>OHIF</title>")
    (dist / "app.bundle.js").write_text("'app'")
    shutil.copy(DEPLOY / "ohif/app-config.js", dist / "app-config.js")  # the compose mount
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandInOrthanc)
    threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True).start()
    orthanc = f"http://127.0.0.1:{upstream.server_address[1]}"
    try:
        with running_ohif_nginx(tmp_path, dist, orthanc, "127.0.0.1 viewer.example") as url:
            # OHIF's routes are the application; its configuration is deploy's, not cached.
            page = requests.get(f"{url}/viewer?StudyInstanceUIDs=1.2.3", timeout=10)
            assert page.status_code == 200 and page.text == "<title>OHIF</title>"
            config = requests.get(f"{url}/app-config.js", timeout=10)
            assert config.text == (DEPLOY / "ohif/app-config.js").read_text()
            assert config.headers["Cache-Control"] == "no-cache"
            assert requests.get(f"{url}/1234.bundle.js", timeout=10).status_code == 404
            # DICOMweb goes to Orthanc with its path and query, and the browser's Host.
            path = "/dicom-web/studies?PatientName=PHANTOM*&limit=101"
            studies = requests.get(url + path, headers={"Host": "viewer.example:3001"}, timeout=10)
            assert studies.status_code == 200 and studies.json() == []
            assert _StandInOrthanc.seen[-1] == (path, "viewer.example:3001")
            # UIDs end in digits after a dot: still DICOMweb, not a missing file.
            frames = "/dicom-web/studies/1.2.3/series/4.5.6/instances/7.8.9/frames/1"
            assert requests.get(url + frames, timeout=10).status_code == 200
            assert _StandInOrthanc.seen[-1][0] == frames
            assert requests.get(url + "/dicom-web/studies/1.2.3", timeout=10).status_code == 200
            # A name it does not serve (localhost, here) is refused before anything else.
            before = len(_StandInOrthanc.seen)
            port = url.rsplit(":", 1)[1]
            other = requests.get(url + path, headers={"Host": f"localhost:{port}"}, timeout=10)
            assert other.status_code == 421 and len(_StandInOrthanc.seen) == before
    finally:
        upstream.shutdown()
        upstream.server_close()
