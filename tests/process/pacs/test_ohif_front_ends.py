"""OHIF's two front ends, deploy/ohif/serve.py and deploy/ohif/nginx.conf (in Debian's
nginx), each in front of a real Orthanc with its DICOMweb plugin.

What they pass: QIDO-RS, WADO-RS metadata, frames and bulk data, STOW-RS of a DICOM
file, with the browser's Host. What they refuse: a catalogue of requests sent as raw
bytes (paths out of /dicom-web to Orthanc's REST API, encoded every way; methods and
types that write; another Host, another Origin; framing a proxy could be misled by),
each a 4xx that Orthanc never sees: its log of HTTP requests (``--verbose-http``) holds
nothing between the request and a marker sent to Orthanc itself after it. And
serve.py's limits: idle connections hold no thread and do not keep a new client out,
slow clients are cut off, bodies and paths are bounded, and no request ends in a
traceback."""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.helpers import REPO, answering, free_port, wait_until
from tests.process.deploy.test_ohif_nginx import running_ohif_nginx
from tests.process.pacs.test_dicomweb import CR, CT, Orthanc, _running_orthanc

OHIF = REPO / "deploy" / "ohif"
T = TypeVar("T")


class LoggedOrthanc:
    """A real Orthanc, and the requests it received, from its log (``--verbose-http``
    writes each as it comes: "(http) GET /system")."""

    _REQUEST = re.compile(r"\(http\) ([A-Z]+ /\S*)")

    def __init__(self, orthanc: Orthanc, log: Path) -> None:
        self.url = orthanc.url
        self.rest = orthanc.rest
        self.log = log
        self._markers = itertools.count()

    def requests(self) -> list[str]:
        return self._REQUEST.findall(self.log.read_text(errors="replace"))

    def passed(self, send: Callable[[], T]) -> tuple[T, list[str]]:
        """What ``send()`` returned, and the requests Orthanc received while it ran: those
        before a marker, asked of Orthanc itself once ``send()`` has had its answer."""
        before = len(self.requests())
        result = send()
        marker = f"/dicom-web/studies/0.{os.getpid()}.{next(self._markers)}"
        requests.get(self.rest + marker, timeout=10)
        seen: list[str] = []

        def marked() -> bool:
            seen[:] = self.requests()[before:]
            return f"GET {marker}" in seen

        wait_until(marked, 10, "the marker in Orthanc's log")
        return result, seen[: seen.index(f"GET {marker}")]


@dataclass(frozen=True)
class Uids:
    study: str
    series: str
    instance: str
    orthanc_study: str  # Orthanc's own identifier, for its REST API
    patient_name: str


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedOrthanc]:
    folder = tmp_path_factory.mktemp("orthanc")
    with _running_orthanc(folder, "--verbose-http") as running:
        yield LoggedOrthanc(running, folder / "log")


@pytest.fixture(scope="module")
def ct(orthanc: LoggedOrthanc) -> Uids:
    """pydicom's CT, in Orthanc."""
    dataset = pydicom.dcmread(CT, stop_before_pixels=True)
    found = requests.post(f"{orthanc.rest}/tools/lookup", data=dataset.StudyInstanceUID, timeout=10)
    (study,) = [item["ID"] for item in found.json() if item["Type"] == "Study"]
    return Uids(
        dataset.StudyInstanceUID,
        dataset.SeriesInstanceUID,
        dataset.SOPInstanceUID,
        study,
        str(dataset.PatientName),
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for OHIF's dist/ (the real viewer is test_ohif.py's)."""
    folder = tmp_path_factory.mktemp("dist")
    (folder / "index.html").write_text("<title>OHIF</title>")
    (folder / "app.bundle.js").write_text("'app'")
    return folder


@dataclass(frozen=True)
class FrontEnd:
    name: str
    port: int
    stderr: Path | None = None  # serve.py's
    pid: int = 0  # serve.py's

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tracebacks(self) -> str:
        """What it wrote to stderr, if it holds a traceback."""
        text = self.stderr.read_text(errors="replace") if self.stderr else ""
        return text if "Traceback" in text else ""


@contextmanager
def _serve_py(folder: Path, dist: Path, dicomweb: str, *options: str) -> Iterator[FrontEnd]:
    """deploy/ohif/serve.py on a free port, its stderr in ``folder``; stopped by its PID."""
    port = free_port()
    stderr = folder / f"serve-{port}.stderr"
    command = [sys.executable, str(OHIF / "serve.py"), "--dist", str(dist), "--port", str(port)]
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [*command, "--dicomweb", dicomweb, *options],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        wait_until(
            answering(f"http://127.0.0.1:{port}/index.html", process),
            20,
            "OHIF's serve.py answering",
            detail=stderr.read_text,
        )
        yield FrontEnd("serve.py", port, stderr, process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


@pytest.fixture(scope="module", params=["serve.py", "nginx"])
def front_end(
    request: pytest.FixtureRequest,
    orthanc: LoggedOrthanc,
    dist: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FrontEnd]:
    """Each front end, with its defaults, in front of the one Orthanc."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "serve.py":
        with _serve_py(folder, dist, orthanc.url) as running:
            yield running
    else:
        with running_ohif_nginx(folder, dist, orthanc.rest, "127.0.0.1 localhost") as url:
            yield FrontEnd("nginx", int(url.rsplit(":", 1)[1]))


def _exchange(port: int, data: bytes, method: str = "") -> tuple[int, dict[str, str], bytes]:
    """``data`` sent as it is on a new connection: the answer's status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = http.client.HTTPResponse(sock, method=method or data.split(b" ")[0].decode())
        answer.begin()
        return answer.status, dict(answer.getheaders()), answer.read()


def _request(
    method: str,
    target: str,
    *headers: str,
    body: bytes = b"",
    host: str | None = "{host}",
    version: str = "HTTP/1.1",
    length: bool = True,
) -> str:
    """A request's head as text, ``{host}``, ``{study}``... to be put in."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += headers
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*lines, "Connection: close", "", ""])


@dataclass(frozen=True)
class Hostile:
    name: str
    head: str
    statuses: tuple[int, ...]  # what each front end may answer (where they differ, both)
    body: bytes = b""

    def data(self, front_end: FrontEnd, ct: Uids) -> bytes:
        fields = {"host": front_end.host, "port": front_end.port, **vars(ct)}
        return self.head.format(**fields).encode("latin-1") + self.body


def _hostile(
    name: str,
    method: str,
    target: str,
    *headers: str,
    status: int | tuple[int, ...],
    body: bytes = b"",
    host: str | None = "{host}",
    version: str = "HTTP/1.1",
    length: bool = True,
) -> Hostile:
    head = _request(method, target, *headers, body=body, host=host, version=version, length=length)
    return Hostile(name, head, (status,) if isinstance(status, int) else status, body)


# Writes to Orthanc's REST API, as the probe of the old front ends sent them.
_MODIFY = json.dumps({"Replace": {"PatientName": "PWNED"}, "KeepSource": False, "Force": True})
_FIND = json.dumps({"Level": "Study", "Query": {}})
_STOW = 'multipart/related; type="application/dicom"; boundary=b'
_STOWING = f"Content-Type: {_STOW}"
_PART = b"--b--"
_EVIL = "Origin: https://evil.example"

CATALOGUE = [
    # Out of /dicom-web to Orthanc's REST API: each way a path can say "..".
    _hostile("encoded-slash", "GET", "/dicom-web/..%2fsystem", status=400),
    _hostile("encoded-slash-upper", "GET", "/dicom-web/studies%2F..%2F..%2Fsystem", status=400),
    _hostile("encoded-dots", "GET", "/dicom-web/%2e%2e/system", status=400),
    _hostile("encoded-dots-upper", "GET", "/dicom-web/%2E%2E/system", status=400),
    _hostile("dot-segments", "GET", "/dicom-web/./../patients", status=400),
    _hostile(
        "dot-segments-deep", "GET", "/dicom-web/studies/{study}/../../../instances", status=400
    ),
    _hostile("trailing-dot-segment", "GET", "/dicom-web/studies/..", status=400),
    _hostile("encoded-backslash", "GET", "/dicom-web/..%5csystem", status=400),
    _hostile("encoded-backslash-upper", "GET", "/dicom-web/..%5Csystem", status=400),
    _hostile("encoded-dots-backslash", "GET", "/dicom-web/x/%2e%2e%5c%2e%2e/system", status=400),
    _hostile("backslash", "GET", "/dicom-web/..\\system", status=400),
    _hostile("double-encoding", "GET", "/dicom-web/%252e%252e/system", status=400),
    _hostile("double-encoded-slash", "GET", "/dicom-web/..%252fsystem", status=400),
    _hostile("overlong-utf8-dots", "GET", "/dicom-web/%c0%ae%c0%ae/system", status=400),
    _hostile("unicode-dot-leaders", "GET", "/dicom-web/%e2%80%a4%e2%80%a4/system", status=400),
    _hostile("fullwidth-dots", "GET", "/dicom-web/%ef%bc%8e%ef%bc%8e/system", status=400),
    _hostile("raw-utf8", "GET", "/dicom-web/\u00e9", status=400),
    _hostile("encoded-unreserved", "GET", "/dicom-web/%73tudies", status=400),
    _hostile("lower-case-hex", "GET", "/dicom-web/studies%3f", status=400),
    _hostile("percent-without-hex", "GET", "/dicom-web/studies%", status=400),
    _hostile("empty-segment", "GET", "/dicom-web//system", status=400),
    _hostile("leading-empty-segment", "GET", "//dicom-web/studies", status=400),
    _hostile("nul", "GET", "/dicom-web/studies%00/../../system", status=400),
    _hostile("nul-alone", "GET", "/dicom-web/a%00b", status=400),
    _hostile("line-feed", "GET", "/dicom-web/studies%0a", status=400),
    _hostile("path-parameter", "GET", "/dicom-web/..;/system", status=404),
    _hostile("path-parameter-on-studies", "GET", "/dicom-web/studies;jsessionid=1", status=404),
    _hostile("encoded-question-mark", "GET", "/dicom-web/studies%3F/../../system", status=400),
    # A query is no path to Orthanc, but one that smuggles a "../" is no DICOMweb query.
    _hostile("query-dot-segments", "GET", "/dicom-web/studies?../../system", status=400),
    _hostile("query-encoded", "GET", "/dicom-web/studies?PatientName=..%2f..%2fsystem", status=400),
    _hostile("query-nul", "GET", "/dicom-web/studies?PatientName=%00", status=400),
    _hostile("query-backslash", "GET", "/dicom-web/studies?PatientName=..%5csystem", status=400),
    # The rest of Orthanc's routes under /dicom-web, and the resources a viewer never asks.
    _hostile("dicomweb-servers", "GET", "/dicom-web/servers", status=404),
    _hostile("dicomweb-info", "GET", "/dicom-web/info", status=404),
    _hostile("not-a-uid", "GET", "/dicom-web/studies/x", status=404),
    _hostile("uid-too-long", "GET", "/dicom-web/studies/" + "1." * 32 + "1", status=404),
    _hostile("the-prefix-alone", "GET", "/dicom-web", status=404),
    # Request targets that are not a path.
    _hostile("absolute-form", "GET", "http://orthanc:8042/system", status=(400, 421)),
    _hostile("absolute-form-here", "GET", "http://{host}/dicom-web/studies", status=400),
    _hostile("asterisk-form", "OPTIONS", "*", status=400),
    _hostile("authority-form", "CONNECT", "127.0.0.1:8042", status=400),
    # Methods that write, or ask what may be written.
    _hostile("options", "OPTIONS", "/dicom-web/studies", "Origin: http://{host}", status=405),
    _hostile(
        "put",
        "PUT",
        "/dicom-web/studies/{study}",
        _STOWING,
        body=_PART,
        status=405,
    ),
    _hostile("delete", "DELETE", "/dicom-web/studies/{study}", status=405),
    _hostile("patch", "PATCH", "/dicom-web/studies/{study}", body=b"{}", status=405),
    _hostile("trace", "TRACE", "/dicom-web/studies", status=405),
    # POST: only STOW-RS's type, at STOW-RS's resources.
    _hostile(
        "post-text-plain",
        "POST",
        "/dicom-web/studies",
        "Content-Type: text/plain",
        body=b"{}",
        status=415,
    ),
    _hostile(
        "post-form",
        "POST",
        "/dicom-web/studies",
        "Content-Type: application/x-www-form-urlencoded",
        body=b"a=b",
        status=415,
    ),
    _hostile(
        "post-form-data",
        "POST",
        "/dicom-web/studies",
        "Content-Type: multipart/form-data; boundary=b",
        body=_PART,
        status=415,
    ),
    _hostile("post-no-type", "POST", "/dicom-web/studies", body=_PART, status=415),
    _hostile(
        "post-related-lookalike",
        "POST",
        "/dicom-web/studies",
        "Content-Type: multipart/relatedx",
        body=_PART,
        status=415,
    ),
    _hostile(
        "post-modify",
        "POST",
        "/dicom-web/studies/x/modify",
        _STOWING,
        body=_PART,
        status=404,
    ),
    _hostile(
        "post-to-series",
        "POST",
        "/dicom-web/studies/{study}/series",
        _STOWING,
        body=_PART,
        status=405,
    ),
    _hostile(
        "post-servers-stow",
        "POST",
        "/dicom-web/servers/x/stow",
        "Content-Type: application/json",
        body=b"{}",
        status=404,
    ),
    _hostile("post-to-a-file", "POST", "/index.html", _STOWING, body=_PART, status=405),
    # The old probe's writes: a study replaced, studies listed.
    _hostile(
        "post-modify-encoded",
        "POST",
        "/dicom-web/..%2fstudies%2f{orthanc_study}%2fmodify",
        _EVIL,
        "Content-Type: text/plain",
        body=_MODIFY.encode(),
        status=400,
    ),
    _hostile(
        "post-modify-backslash",
        "POST",
        "/dicom-web/..%5cstudies%5c{orthanc_study}%5cmodify",
        _EVIL,
        "Content-Type: text/plain",
        body=_MODIFY.encode(),
        status=400,
    ),
    _hostile(
        "post-find-backslash",
        "POST",
        "/dicom-web/..%5ctools%5cfind",
        "Content-Type: application/json",
        body=_FIND.encode(),
        status=400,
    ),
    # Another Host: a DNS rebinding page, or a URL written into Orthanc's answers.
    _hostile(
        "rebinding-host",
        "GET",
        "/dicom-web/studies",
        host="rebind.attacker.example:{port}",
        status=421,
    ),
    _hostile(
        "host-with-userinfo", "GET", "/dicom-web/studies", host="{host}@evil.example", status=421
    ),
    _hostile("no-host", "GET", "/dicom-web/studies", host=None, version="HTTP/1.0", status=421),
    _hostile(
        "two-hosts", "GET", "/dicom-web/studies", "Host: rebind.attacker.example", status=(400, 421)
    ),
    # Another Origin: a cross-site page.
    _hostile("evil-origin", "GET", "/dicom-web/studies", _EVIL, status=403),
    _hostile("null-origin", "GET", "/dicom-web/studies", "Origin: null", status=403),
    _hostile(
        "evil-origin-stow",
        "POST",
        "/dicom-web/studies",
        _EVIL,
        _STOWING,
        body=_PART,
        status=403,
    ),
    _hostile(
        "origin-with-a-path", "GET", "/dicom-web/studies", "Origin: http://{host}/x", status=403
    ),
    # A body's framing.
    _hostile("post-no-length", "POST", "/dicom-web/studies", _STOWING, status=411),
    _hostile(
        "post-negative-length",
        "POST",
        "/dicom-web/studies",
        _STOWING,
        "Content-Length: -1",
        status=400,
    ),
    _hostile(
        "post-length-not-decimal",
        "POST",
        "/dicom-web/studies",
        _STOWING,
        "Content-Length: 1e3",
        status=400,
    ),
    _hostile(
        "post-two-lengths",
        "POST",
        "/dicom-web/studies",
        _STOWING,
        "Content-Length: 5",
        "Content-Length: 6",
        body=_PART,
        length=False,
        status=400,
    ),
    _hostile(
        "post-length-and-chunked",
        "POST",
        "/dicom-web/studies",
        _STOWING,
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        body=b"0\r\n\r\n",
        length=False,
        status=400,
    ),
    _hostile(
        "post-oversize",
        "POST",
        "/dicom-web/studies",
        _STOWING,
        f"Content-Length: {2**30 + 1}",
        status=413,
    ),
    # Lengths.
    _hostile("segment-of-300", "GET", "/" + "a" * 299, status=414),
    _hostile("dicomweb-segment-of-300", "GET", "/dicom-web/studies/" + "1" * 281, status=414),
    _hostile("path-of-10-kb", "GET", "/dicom-web/" + "a/" * 5000, status=414),
]


@pytest.mark.parametrize("hostile", CATALOGUE, ids=[hostile.name for hostile in CATALOGUE])
def test_a_hostile_request_is_refused_and_never_reaches_orthanc(
    front_end: FrontEnd, orthanc: LoggedOrthanc, ct: Uids, hostile: Hostile
) -> None:
    data = hostile.data(front_end, ct)
    (status, _, body), passed = orthanc.passed(lambda: _exchange(front_end.port, data))
    assert status in hostile.statuses, body[:300]
    assert passed == []
    assert b"ApiVersion" not in body  # Orthanc's /system
    assert not front_end.tracebacks()


def test_the_study_is_as_it_was(front_end: FrontEnd, orthanc: LoggedOrthanc, ct: Uids) -> None:
    """The probe's write through each front end (a study replaced, its source not kept)
    left it in place, unchanged."""
    for hostile in ("post-modify-encoded", "post-modify-backslash"):
        (entry,) = [entry for entry in CATALOGUE if entry.name == hostile]
        assert _exchange(front_end.port, entry.data(front_end, ct))[0] == 400
    study = requests.get(f"{orthanc.rest}/studies/{ct.orthanc_study}", timeout=10)
    assert study.status_code == 200
    assert study.json()["PatientMainDicomTags"]["PatientName"] == ct.patient_name
    assert len(requests.get(f"{orthanc.rest}/studies", timeout=10).json()) == 2  # CR and CT


def _get(front_end: FrontEnd, target: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    return _exchange(
        front_end.port, _request("GET", target, *headers).format(host=front_end.host).encode()
    )


def test_a_viewer_reads_studies_through_it(
    front_end: FrontEnd, orthanc: LoggedOrthanc, ct: Uids
) -> None:
    """What OHIF asks: QIDO-RS, WADO-RS metadata, frames and bulk data; Orthanc writes
    its URLs for the browser's Host, and the request reaches it as it was asked."""
    query = "/dicom-web/studies?PatientName=*&includefield=00081030&limit=101&offset=0"
    (status, _, body), passed = orthanc.passed(
        lambda: _get(front_end, query, f"Origin: http://{front_end.host}")
    )
    assert status == 200, body[:300]
    studies = {item["0020000D"]["Value"][0]: item for item in json.loads(body)}
    cr = pydicom.dcmread(CR, stop_before_pixels=True).StudyInstanceUID
    assert {ct.study, cr} <= set(studies)
    assert studies[ct.study]["00081190"]["Value"][0].startswith(
        f"http://{front_end.host}/dicom-web/"
    )
    assert passed == ["GET /dicom-web/studies"]  # Orthanc's log has no query
    series = f"/dicom-web/studies/{ct.study}/series/{ct.series}"
    status, _, body = _get(front_end, series + "/metadata")
    assert status == 200 and json.loads(body)[0]["00080018"]["Value"] == [ct.instance]
    instance = f"{series}/instances/{ct.instance}"
    status, headers, body = _get(
        front_end,
        instance + "/frames/1",
        'Accept: multipart/related; type="application/octet-stream"',
    )
    assert status == 200 and headers["Content-Type"].startswith("multipart/related")
    assert len(body) > 128 * 128 * 2  # CT_small: 128 x 128, 16 bits
    status, _, body = _get(front_end, instance + "/bulk/7fe00010")
    assert status == 200 and len(body) > 128 * 128 * 2
    status, _, body = _get(front_end, f"/dicom-web/studies/{ct.study}/series?Modality=CT")
    # (With the series STOW-RS stored through either front end, in the other test.)
    assert status == 200 and ct.series in {
        item["0020000E"]["Value"][0] for item in json.loads(body)
    }


def _multipart(dicom: bytes) -> tuple[str, bytes]:
    boundary = "gradcam-front-end-test"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + dicom
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body


def _new_instance(ct: Uids) -> tuple[str, str, bytes]:
    """pydicom's CT as a new series of its study: (series, instance, Part 10 bytes)."""
    dataset = pydicom.dcmread(CT)
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return dataset.SeriesInstanceUID, dataset.SOPInstanceUID, buffer.getvalue()


def test_stow_rs_stores_through_it(front_end: FrontEnd, orthanc: LoggedOrthanc, ct: Uids) -> None:
    series, instance, dicom = _new_instance(ct)
    kind, body = _multipart(dicom)
    head = _request(
        "POST",
        f"/dicom-web/studies/{ct.study}",
        f"Content-Type: {kind}",
        f"Origin: http://{front_end.host}",
        body=body,
    )
    (status, _, answer), passed = orthanc.passed(
        lambda: _exchange(front_end.port, head.format(host=front_end.host).encode() + body)
    )
    assert status == 200, answer[:300]
    assert passed == [f"POST /dicom-web/studies/{ct.study}"]
    status, _, found = _get(front_end, f"/dicom-web/studies/{ct.study}/series/{series}/instances")
    assert status == 200 and json.loads(found)[0]["00080018"]["Value"] == [instance]


# -- serve.py's limits ----------------------------------------------------------------


@pytest.fixture
def serve_py(
    orthanc: LoggedOrthanc, dist: Path, tmp_path: Path
) -> Iterator[Callable[..., FrontEnd]]:
    """Starts serve.py with options, in front of the Orthanc; stops each by its PID."""
    with ExitStack() as running:
        yield lambda *options: running.enter_context(
            _serve_py(tmp_path, dist, orthanc.url, *options)
        )


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    (count,) = re.findall(r"^Threads:\s+(\d+)", status, re.M)
    return int(count)


def _sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            count += os.readlink(fd).startswith("socket:")
    return count


def test_idle_connections_hold_no_thread_and_keep_no_one_out(
    serve_py: Callable[..., FrontEnd],
) -> None:
    served = serve_py("--threads", "4", "--max-connections", "64")
    with ExitStack() as idle:
        for _ in range(300):
            idle.enter_context(socket.create_connection(("127.0.0.1", served.port), timeout=10))
        # A client that comes after them is answered at once: an idle one made room.
        started = time.monotonic()
        assert _get(served, "/index.html")[0] == 200
        assert time.monotonic() - started < 5
        assert _threads(served.pid) <= 1 + 4  # the loop's and the answering threads
        # The connections it holds, its listening socket and its loop's wake-up pair.
        assert _sockets(served.pid) <= 64 + 3
    assert not served.tracebacks()


def _answer(sock: socket.socket) -> int:
    answer = http.client.HTTPResponse(sock, method="GET")
    answer.begin()
    answer.read()
    return answer.status


def test_slow_clients_are_cut_off(serve_py: Callable[..., FrontEnd], ct: Uids) -> None:
    served = serve_py("--idle-timeout-s", "1", "--header-timeout-s", "1", "--body-timeout-s", "1")
    address = ("127.0.0.1", served.port)
    # A connection that sends nothing is closed, unanswered.
    with socket.create_connection(address, timeout=10) as idle:
        assert idle.recv(100) == b""
    # Headers that stop coming, and a body: a 408, then the connection closed.
    with socket.create_connection(address, timeout=10) as slow:
        slow.sendall(f"GET /index.html HTTP/1.1\r\nHost: {served.host}\r\n".encode())
        assert _answer(slow) == 408
    head = _request(
        "POST", f"/dicom-web/studies/{ct.study}", f"Content-Type: {_STOW}", "Content-Length: 1000"
    )
    with socket.create_connection(address, timeout=10) as slow:
        slow.sendall(head.format(host=served.host).encode() + b"--b\r\n")
        assert _answer(slow) == 408
    assert not served.tracebacks()


def test_an_oversize_body_is_refused_before_it_is_sent_on(
    serve_py: Callable[..., FrontEnd], orthanc: LoggedOrthanc, ct: Uids
) -> None:
    served = serve_py("--max-body-bytes", "100000")
    _, _, dicom = _new_instance(ct)
    assert 30_000 < len(dicom) < 50_000
    kind, body = _multipart(dicom * 3)
    head = _request("POST", "/dicom-web/studies", f"Content-Type: {kind}", body=body)
    # Sent whole before its answer is read: the refused body is read and dropped.
    (status, _, answer), passed = orthanc.passed(
        lambda: _exchange(served.port, head.format(host=served.host).encode() + body)
    )
    assert (status, passed) == (413, []), answer
    # One within the limit goes through.
    _, _, dicom = _new_instance(ct)
    kind, body = _multipart(dicom)
    head = _request("POST", "/dicom-web/studies", f"Content-Type: {kind}", body=body)
    status, _, answer = _exchange(served.port, head.format(host=served.host).encode() + body)
    assert status == 200, answer[:300]
    assert not served.tracebacks()


MALFORMED = [
    pytest.param(b"GET /\r\n\r\n", 400, id="http-0.9"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: {host}\r\n\r\n", 400, id="http-2"),
    pytest.param(b"GET  /index.html HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, id="two-spaces"),
    pytest.param(b"GET\t/index.html HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, id="tab"),
    pytest.param(b"G\x00T /index.html HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, id="nul-method"),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400, id="tls"),
    pytest.param(b"GET /%ff HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, id="encoded-byte"),
    pytest.param(b"GET /\xff HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, id="raw-byte"),
    pytest.param(
        b"GET /index.html HTTP/1.1\r\nHost: {host}\r\nX: a\r\n folded\r\n\r\n", 400, id="fold"
    ),
    pytest.param(b"GET /index.html HTTP/1.1\r\nHost: {host}\r\nNo colon\r\n\r\n", 400, id="colon"),
    pytest.param(b"GET /index.html HTTP/1.1\r\nHost : {host}\r\n\r\n", 400, id="space-colon"),
    pytest.param(b"GET /index.html HTTP/1.1\r\nHost: {host}\r\nX: \x01\r\n\r\n", 400, id="control"),
    pytest.param(
        b"GET /index.html HTTP/1.1\r\nHost: {host}\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        431,
        id="101-headers",
    ),
    pytest.param(
        b"GET /index.html HTTP/1.1\r\nHost: {host}\r\nX: " + b"y" * 40_000 + b"\r\n\r\n",
        431,
        id="40-kb-header",
    ),
    pytest.param(b"GET /" + b"a" * 10_000, 414, id="10-kb-line-unended"),
]


@pytest.mark.parametrize(("data", "status"), MALFORMED)
def test_a_malformed_request_gets_a_4xx_not_a_traceback(
    serve_py: Callable[..., FrontEnd], data: bytes, status: int
) -> None:
    served = serve_py()
    sent = data.replace(b"{host}", served.host.encode())
    assert _exchange(served.port, sent, method="GET")[0] == status
    assert _get(served, "/index.html")[0] == 200
    assert not served.tracebacks()
