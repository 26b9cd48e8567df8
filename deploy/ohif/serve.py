"""Serve the OHIF viewer and a DICOMweb server from one origin, without containers.

OHIF is a static web application: a browser loads its files, then reads studies from
a DICOMweb server. Browsers refuse cross-origin reads unless that server answers CORS,
which Orthanc does not, so this serves both under one address:

- ``/dicom-web/...`` is passed to the DICOMweb server (``--dicomweb``), with the
  browser's ``Host`` header, so that the URLs Orthanc writes into its answers point
  back here;
- ``/app-config.js`` is OHIF's configuration (``--config``, by default
  ``app-config.js`` beside this file, which reads ``/dicom-web`` on this origin);
- any other path is a file of OHIF's built ``dist/`` folder (``--dist``), and a path
  that names no file (``/viewer?StudyInstanceUIDs=...``) gets ``index.html``, as a
  single-page application needs.

Orthanc's DICOMweb root sits beside its whole REST API, which writes and deletes, and
any web page a user opens can send requests here. So only DICOMweb passes, by the rules
nginx.conf (the compose profile ``pacs``) keeps too:

- a path in normal form: decoded once, with no dot segment, no empty one, no encoded
  ``/`` or ``\\``, nothing that decodes to a control character, a byte beyond ASCII or
  a ``%``, and no encoding its normal form would not have (else 400); a segment longer
  than 255 characters or a target longer than 8 KiB is a 414;
- under ``/dicom-web``, only the DICOMweb resources a viewer reads (studies, series,
  instances, their metadata, frames, rendered and thumbnail images, Orthanc's bulk data
  URIs; UIDs of digits and dots; else 404), with a query of DICOM attribute names
  whose values hold no control character, backslash or dot segment (else 400);
- GET and HEAD; POST only as STOW-RS: ``multipart/related`` (a type a cross-site page
  cannot send without a preflight, which nothing here grants) to
  ``/dicom-web/studies[/{study}]``, with a Content-Length up to ``--max-body-bytes``,
  streamed on (405, 415, 411, 413 otherwise);
- a ``Host`` this serves (``127.0.0.1:<port>``, ``localhost:<port>``, the bound address,
  and each ``--allowed-host``; else 421: a DNS rebinding page is not answered), and no
  ``Origin`` but the request's own (else 403).

What is passed is the path as checked, re-encoded, never the raw one. Connections wait
for a request without a thread: a few threads (``--threads``) answer requests, up to
``--max-connections`` stay open (an idle one is closed to let a new one in), and each
waits at most ``--idle-timeout-s`` for a request, ``--header-timeout-s`` for its
headers and ``--body-timeout-s`` between two reads or writes of a body. A malformed
request gets a short plain-text 4xx, never a traceback.

Only the standard library. It listens on 127.0.0.1 by default and adds no
authentication: whoever reaches it reads the DICOMweb server, and may store in it.

    python3 deploy/ohif/serve.py --dist .cache/ohif/3.13.2/dist \\
        --dicomweb http://127.0.0.1:8042/dicom-web --port 3001
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http
import http.client
import mimetypes
import os
import queue
import re
import selectors
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

PREFIX = "/dicom-web"  # where app-config.js reads DICOMweb, on this origin
MAX_TARGET_BYTES = 8192  # a request line's target; nginx's default buffer for it is 8k
MAX_SEGMENT_BYTES = 255  # a file name's limit; UIDs are at most 64
MAX_HEADER_BYTES = 32768
MAX_HEADERS = 100
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".html": "text/html; charset=utf-8",
}
_CHUNK_BYTES = 1 << 16
# After a refusal: how long, and how much, a client may go on sending before its
# connection is closed.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20

# What passes. The same rules, as regular expressions on the raw request, are nginx.conf's.
#
# The characters a path keeps as they are in its normal form (with letters, digits and
# -._~); quote() encodes every other one, as a browser does.
_PATH_SAFE = "!$&'()*+,;=:@/"
_PERCENT_WITHOUT_HEX = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A UID: digits and dots, at most 64 characters; not stricter (leading zeros), since a
# viewer meets the UIDs of other systems.
_UID = r"(?=[0-9.]{1,64}(?:/|$))[0-9]+(?:\.[0-9]+)*"
_FRAMES = r"[0-9]{1,9}(?:,[0-9]{1,9})*"
_TAG = r"[0-9A-Fa-f]{8}"
# PS3.18's resources that a viewer reads, and Orthanc's bulk data URIs (bulk/ and a tag,
# behind each sequence's tag and item number): an allow-list rather than a deny-list of
# Orthanc's other routes, which grow with each Orthanc and plugin.
_DICOMWEB = re.compile(
    rf"""/dicom-web/(?:
        studies|series|instances
      | studies/{_UID}(?:/(?:metadata|rendered|thumbnail|series|instances))?
      | studies/{_UID}/series/{_UID}(?:/(?:metadata|rendered|thumbnail|instances))?
      | studies/{_UID}/series/{_UID}/instances/{_UID}(?:/(?:
            metadata|rendered|thumbnail
          | frames/{_FRAMES}(?:/(?:rendered|thumbnail))?
          | bulk(?:/{_TAG}/[0-9]{{1,9}})*/{_TAG}
        ))?
    )""",
    re.VERBOSE,
)
_STOW = re.compile(rf"/dicom-web/studies(?:/{_UID})?")
# A query parameter: a DICOM keyword, a tag, a dotted sequence path or a QIDO option.
_QUERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._]*")
_QUERY_VALUE = re.compile(r"[A-Za-z0-9._~!$'()*+,;:@/?%-]*")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")


class _Refused(Exception):
    """A request answered here with a short plain-text 4xx; the connection is closed
    after it (a body it came with is not read)."""

    def __init__(self, status: int, text: str, allow: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.allow = allow


def normal_path(raw: str) -> str:
    """The decoded path of a request target (its part before ``?``) if it is in normal
    form; raises _Refused otherwise."""
    if _PERCENT_WITHOUT_HEX.search(raw):
        raise _Refused(400, "not a normalised path")
    decoded = urllib.parse.unquote_to_bytes(raw)
    # Control characters, bytes beyond ASCII (overlong UTF-8, Unicode dots), a backslash
    # (a separator to Orthanc) or a % (double encoding): none names a file or a resource.
    if any(byte < 0x20 or byte > 0x7E for byte in decoded) or b"\\" in decoded or b"%" in decoded:
        raise _Refused(400, "not a normalised path")
    path = decoded.decode("ascii")
    # Re-encoded, it must be what came: else something was encoded that need not be (%2e,
    # %2f: an encoded separator) or not as a browser does (lower-case hex).
    if urllib.parse.quote(path, safe=_PATH_SAFE) != raw:
        raise _Refused(400, "not a normalised path")
    segments = path.split("/")[1:]
    if any(segment in (".", "..") for segment in segments) or "" in segments[:-1]:
        raise _Refused(400, "not a normalised path")
    if any(len(segment) > MAX_SEGMENT_BYTES for segment in segments):
        raise _Refused(414, "a path segment longer than 255 characters")
    return path


def dicomweb_query(raw: str) -> None:
    """Raises _Refused unless ``raw`` (a query, as sent) is a DICOMweb query."""
    if not raw:
        return
    for parameter in raw.split("&"):
        name, _, value = parameter.partition("=")
        if not (
            _QUERY_NAME.fullmatch(name)
            and _QUERY_VALUE.fullmatch(value)
            and not _PERCENT_WITHOUT_HEX.search(value)
        ):
            raise _Refused(400, "not a DICOMweb query")
        decoded = urllib.parse.unquote_to_bytes(value)
        if (
            any(byte < 0x20 or byte == 0x7F for byte in decoded)
            or b"\\" in decoded
            or any(part in (b".", b"..") for part in decoded.split(b"/"))
        ):
            raise _Refused(400, "not a DICOMweb query")


@dataclass(frozen=True)
class Limits:
    """How much one client may hold, and for how long."""

    threads: int = 16  # requests answered at once
    max_connections: int = 256
    idle_timeout_s: float = 60.0  # waiting for a request
    header_timeout_s: float = 10.0  # from a request's first byte to its last header
    body_timeout_s: float = 30.0  # between two reads of a body, or two writes of an answer
    max_body_bytes: int = 1 << 30  # STOW-RS; nginx.conf's client_max_body_size 1g


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]  # as sent; names keep their case

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name]


def _parse(block: bytes) -> _Request:
    """A request line and its headers (``block``, without the empty line after them)."""
    lines = _LINE_END.split(block)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise _Refused(400, "not an HTTP request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Refused(400, "HTTP/1.1 or HTTP/1.0 is expected")
    if len(target) > MAX_TARGET_BYTES:
        raise _Refused(414, "a request target longer than 8 KiB")
    if any(byte < 0x21 or byte > 0x7E for byte in target):
        raise _Refused(400, "not a normalised path")
    # A browser sends a path, never a URL (whose host would stand for the Host header).
    if not target.startswith(b"/"):
        raise _Refused(400, "a path is expected")
    if len(lines) - 1 > MAX_HEADERS:
        raise _Refused(431, "more than 100 header fields")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No obsolete line folding, no space before the colon (both smuggle requests).
        if not colon or not _TOKEN.fullmatch(name):
            raise _Refused(400, "not an HTTP header field")
        value = value.strip(b" \t")
        if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value):
            raise _Refused(400, "not an HTTP header field")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return _Request(
        method.decode("ascii"), target.decode("ascii"), version.decode(), tuple(headers)
    )


_UNPARSED = _Request("", "", "", ())  # what stands for a request that did not parse


def _body_length(request: _Request) -> int | None:
    """The body's length by its Content-Length, None without one."""
    if request.values("transfer-encoding"):
        if request.values("content-length"):
            raise _Refused(400, "both Content-Length and Transfer-Encoding")
        raise _Refused(411, "a body needs its Content-Length (no chunked bodies here)")
    lengths = {
        value.strip() for field in request.values("content-length") for value in field.split(",")
    }
    if not lengths:
        return None
    if len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,19}", value) for value in lengths):
        raise _Refused(400, "Content-Length is not a length")
    return int(lengths.pop())


@dataclass(eq=False)
class _Connection:
    """A client's connection: what it sent and nobody has read yet, and since when it
    waits (for a request, or for the rest of one)."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    idle_since: float = 0.0
    request_since: float | None = None
    discarded: int = 0  # bytes read and dropped after a refusal

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of a body (blocking, the socket's timeout each read)."""
        if self.buffer:
            data = bytes(self.buffer[:limit])
            del self.buffer[:limit]
            return data
        data = self.sock.recv(limit)
        if not data:
            raise ConnectionAbortedError("the client closed its connection")
        return data


@dataclass(frozen=True)
class _Site:
    """What the answers are made from; shared by the threads, read-only."""

    dist: Path
    config: Path
    upstream: urllib.parse.SplitResult
    timeout_s: float
    verbose: bool
    allowed_hosts: frozenset[str]
    limits: Limits


class _Exchange:
    """One request on a connection, answered by a worker thread."""

    def __init__(self, site: _Site, connection: _Connection, request: _Request) -> None:
        self.site = site
        self.connection = connection
        self.request = request
        self.head_only = request.method == "HEAD"
        self.keep_alive = request.version == "HTTP/1.1" and "close" not in _tokens(
            request.values("connection")
        )
        self.status = 0

    def answer(self) -> bool:
        """Answers the request; whether the connection may carry another one."""
        try:
            self._route()
        except _Refused as refused:
            self.answer_refused(refused)
        except OSError:
            raise  # the client or the DICOMweb server gone, or too slow: nothing to answer
        except Exception as error:  # a bug: the client still gets an answer, not a silence
            _log(f"answering a request: {type(error).__name__}")
            self.keep_alive = False
            if not self.status:
                self._plain(500, "the server failed")
        return self.keep_alive

    def answer_refused(self, refused: _Refused) -> None:
        self.keep_alive = False
        self._plain(refused.status, refused.text, allow=refused.allow)

    def _route(self) -> None:
        request = self.request
        hosts = request.values("host")
        if len(hosts) != 1 or hosts[0].lower() not in self.site.allowed_hosts:
            raise _Refused(421, "not a host this server answers for")
        host = hosts[0]
        raw_path, _, raw_query = request.target.partition("?")
        path = normal_path(raw_path)
        for origin in request.values("origin"):
            scheme, separator, rest = origin.partition("://")
            if (
                scheme.lower() not in ("http", "https")
                or not separator
                or rest.lower() != host.lower()
            ):
                raise _Refused(403, "another origin")
        if request.method not in ("GET", "HEAD", "POST"):
            raise _Refused(405, "GET, HEAD or POST", allow="GET, HEAD, POST")
        length = _body_length(request)
        if path == PREFIX or path.startswith(PREFIX + "/"):
            if not _DICOMWEB.fullmatch(path):
                raise _Refused(404, "not a DICOMweb resource")
            dicomweb_query(raw_query)
            if request.method == "POST":
                self._check_stow(path, length)
            elif length:
                raise _Refused(400, "a GET or HEAD carries no body")
            self._proxy(path, raw_query, host, length or 0)
            return
        if request.method == "POST":
            raise _Refused(405, "only DICOMweb takes POST here", allow="GET, HEAD")
        if length:
            raise _Refused(400, "a GET or HEAD carries no body")
        if path == "/app-config.js":
            self._file(self.site.config)
        else:
            self._static(path)

    def _check_stow(self, path: str, length: int | None) -> None:
        if not _STOW.fullmatch(path):
            raise _Refused(
                405, "only STOW-RS takes POST, at /dicom-web/studies[/{study}]", allow="GET, HEAD"
            )
        kinds = self.request.values("content-type")
        if len(kinds) != 1 or kinds[0].split(";")[0].strip().lower() != "multipart/related":
            raise _Refused(415, "STOW-RS takes multipart/related")
        if length is None:
            raise _Refused(411, "a POST needs its Content-Length")
        if length > self.site.limits.max_body_bytes:
            raise _Refused(413, f"a body over {self.site.limits.max_body_bytes} bytes")

    def _static(self, path: str) -> None:
        relative = path.lstrip("/")
        dist = self.site.dist
        try:
            target = (dist / relative).resolve()
            found = target.is_relative_to(dist) and target.is_file()
        except OSError:  # a name too long for this file system, a loop of links
            found = False
        if found:
            self._file(target)
        elif "." in relative.rsplit("/", 1)[-1]:
            # A missing asset is a 404, not the application (which would not parse as one).
            self._plain(404, "not found")
        else:
            self._file(dist / "index.html")

    def _file(self, path: Path) -> None:
        kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        try:
            opened = path.open("rb")
        except OSError:
            self._plain(404, "not found")
            return
        with opened:
            size = os.fstat(opened.fileno()).st_size
            headers = [("Content-Type", kind or "application/octet-stream")]
            headers.append(("Content-Length", str(size)))
            # The configuration and the page change with a deployment; hashed bundles do not.
            if path.name in ("index.html", "app-config.js"):
                headers.append(("Cache-Control", "no-cache"))
            self._head(200, headers)
            if not self.head_only:
                self.connection.sock.sendfile(opened)

    def _head(self, status: int, headers: list[tuple[str, str]], reason: str = "") -> None:
        self.status = status
        lines = [
            f"HTTP/1.1 {status} {reason or http.HTTPStatus(status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: ohif-serve",
            *(f"{name}: {value}" for name, value in headers),
        ]
        if not self.keep_alive:
            lines.append("Connection: close")
        self.connection.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _plain(self, status: int, text: str, allow: str = "") -> None:
        data = (text + "\n").encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
        ]
        if allow:
            headers.append(("Allow", allow))
        self._head(status, headers)
        if not self.head_only:
            self.connection.sock.sendall(data)

    def _proxy(self, path: str, query: str, host: str, length: int) -> None:
        upstream = self.site.upstream
        # The path as checked, re-encoded (quote() gives back what normal_path() compared).
        target = upstream.path.rstrip("/") + urllib.parse.quote(
            path[len(PREFIX) :], safe=_PATH_SAFE
        )
        if query:
            target += "?" + query
        # Besides hop-by-hop headers: Host (put first, as checked) and the body's framing.
        dropped = _HOP_BY_HOP | _tokens(self.request.values("connection"))
        dropped |= {"host", "content-length", "expect"}
        connection = http.client.HTTPConnection(
            upstream.hostname or "127.0.0.1", upstream.port or 80, timeout=self.site.timeout_s
        )
        try:
            try:
                connection.putrequest(
                    self.request.method, target, skip_host=True, skip_accept_encoding=True
                )
                # Orthanc writes URLs for the Host it is asked on: the browser's (checked).
                connection.putheader("Host", host)
                for name, value in self.request.headers:
                    if name.lower() not in dropped:
                        connection.putheader(name, value)
                if self.request.method == "POST":
                    connection.putheader("Content-Length", str(length))
                connection.endheaders()
            except OSError as error:
                self._upstream_failed(error)
                return
            if length and not self._stream_body(connection, length):
                return
            try:
                answer = connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                self._upstream_failed(error)
                return
            self._relay(answer)
        finally:
            connection.close()

    def _stream_body(self, connection: http.client.HTTPConnection, length: int) -> bool:
        """The request's body to the DICOMweb server, a chunk at a time as it comes."""
        if any(value.lower() == "100-continue" for value in self.request.values("expect")):
            self.connection.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        remaining = length
        while remaining:
            try:
                chunk = self.connection.read_some(min(_CHUNK_BYTES, remaining))
            except TimeoutError:
                self.keep_alive = False
                self._plain(408, "the body stopped coming")
                return False
            except OSError:
                self.keep_alive = False
                self.status = 499
                return False
            try:
                connection.send(chunk)
            except OSError as error:
                # The rest of the body is not read: this connection cannot carry another.
                self.keep_alive = False
                self._upstream_failed(error)
                return False
            remaining -= len(chunk)
        return True

    def _upstream_failed(self, error: BaseException) -> None:
        # The type only: a message could quote the request (UIDs in the path).
        _log(f"DICOMweb server: {type(error).__name__}")
        self._plain(502, "the DICOMweb server did not answer")

    def _relay(self, answer: http.client.HTTPResponse) -> None:
        dropped = _HOP_BY_HOP | _tokens(answer.headers.get_all("Connection", []))
        headers = [
            (name, value)
            for name, value in answer.getheaders()
            if name.lower() not in dropped | {"content-length"}
        ]
        size = answer.getheader("Content-Length")
        bodiless = self.head_only or answer.status in (204, 304) or answer.status < 200
        if size is not None:
            headers.append(("Content-Length", size))
        # Orthanc sends large answers (a study's instances) in chunks: so does this, as
        # they come, rather than hold them (to HTTP/1.0, up to the connection's end).
        chunked = size is None and not bodiless and self.keep_alive
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif size is None and not bodiless:
            self.keep_alive = False
        self._head(answer.status, headers, answer.reason)
        if bodiless:
            return
        sock = self.connection.sock
        while True:
            try:
                chunk = answer.read1(_CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:
                _log(f"DICOMweb server: {type(error).__name__}")
                self.keep_alive = False  # an answer cut short: the client sees it end early
                return
            if not chunk:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            sock.sendall(b"0\r\n\r\n")


def _tokens(values: list[str]) -> set[str]:
    """The comma-separated tokens of a header's values (Connection), in lower case."""
    return {token.strip().lower() for value in values for token in value.split(",")}


def _log(line: str) -> None:
    sys.stderr.write(f"ohif-serve: {line}\n")


def _plain_answer(status: int, text: str) -> bytes:
    """A short answer from the loop (to a request it does not pass to a thread)."""
    data = (text + "\n").encode()
    return (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + data


class Server:
    """OHIF's files and DICOMweb on one socket: one thread waits on every connection
    (selectors), and a request whose headers have all come is answered by one of
    ``limits.threads`` threads, so an idle connection holds no thread. The interface of
    socketserver's servers: ``serve_forever``, ``shutdown``, ``server_close``."""

    def __init__(self, site: _Site, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.site = site
        self._jobs: queue.SimpleQueue[tuple[_Connection, _Request | _Refused] | None] = (
            queue.SimpleQueue()
        )
        self._returned: queue.SimpleQueue[tuple[_Connection, bool]] = queue.SimpleQueue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        # Owned by the loop's thread alone. Each open connection is in one of these, or
        # with a thread.
        self._selector = selectors.DefaultSelector()
        self._open = 0
        self._idle: dict[_Connection, None] = {}  # waiting for a request, oldest first
        self._reading: dict[_Connection, None] = {}  # part of a request came, oldest first
        self._lingering: dict[_Connection, float] = {}  # closing: until when
        self._listening = False
        self._paused_until = 0.0

    # -- the loop ---------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        workers = [
            threading.Thread(target=self._work, name=f"ohif-serve-{n}", daemon=True)
            for n in range(self.site.limits.threads)
        ]
        for worker in workers:
            worker.start()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        self._listen(True)
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(poll_interval):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    else:
                        self._receive(key.data)
                self._expire(time.monotonic())
        finally:
            for _ in workers:
                self._jobs.put(None)
            for connection in [*self._idle, *self._reading, *self._lingering]:
                self._close(connection)
            self._selector.unregister(self._wake_reader)
            self._listen(False)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stops serve_forever() and waits until it has returned."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        while True:
            try:
                connection, _ = self._returned.get_nowait()
            except queue.Empty:
                break
            connection.sock.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _listen(self, on: bool) -> None:
        on = on and not self._stop.is_set() and self._paused_until <= time.monotonic()
        if on and not self._listening:
            self._selector.register(self.socket, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._selector.unregister(self.socket)
        self._listening = on

    def _accept(self) -> None:
        limits = self.site.limits
        while True:
            if self._open >= limits.max_connections:
                if not self._idle:
                    # Every connection is busy: new ones wait in the listen queue.
                    self._listen(False)
                    return
                # Like nginx, an idle keep-alive connection makes room for a new one.
                self._close(next(iter(self._idle)))
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of file descriptors: try again a little later
                _log(f"accept: {type(error).__name__}")
                self._paused_until = time.monotonic() + 0.5
                self._listen(False)
                return
            sock.setblocking(False)
            # An answer's head and body go in separate writes: without this, Nagle's
            # algorithm holds the body back for the client's delayed ACK (40 ms each).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, idle_since=time.monotonic())
            self._open += 1
            self._idle[connection] = None
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _receive(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if connection in self._lingering:
            connection.discarded += len(data)
            if not data or connection.discarded > LINGER_BYTES:
                self._close(connection)
        elif not data:
            self._close(connection)
        else:
            connection.buffer += data
            self._take_request(connection)

    def _take_request(self, connection: _Connection) -> None:
        """Hands a request to a thread once its headers are all here."""
        buffer = connection.buffer
        # Empty lines before a request line are ignored (RFC 9112, 2.2).
        while buffer[:2] == b"\r\n" or buffer[:1] == b"\n":
            del buffer[: 2 if buffer[:1] == b"\r" else 1]
        if not buffer:
            return
        if connection.request_since is None:
            connection.request_since = time.monotonic()
            self._idle.pop(connection, None)
            self._reading[connection] = None
        end = _HEADER_END.search(buffer)
        if end is None:
            if b"\n" not in buffer and len(buffer) > MAX_TARGET_BYTES + 64:
                self._linger(connection, _plain_answer(414, "a request target longer than 8 KiB"))
            elif len(buffer) > MAX_HEADER_BYTES:
                self._linger(connection, _plain_answer(431, "headers over 32 KiB"))
            return
        if end.start() > MAX_HEADER_BYTES:
            self._linger(connection, _plain_answer(431, "headers over 32 KiB"))
            return
        block = bytes(buffer[: end.start()])
        del buffer[: end.end()]
        self._reading.pop(connection, None)
        self._selector.unregister(connection.sock)
        try:
            job: _Request | _Refused = _parse(block)
        except _Refused as refused:
            job = refused
        self._jobs.put((connection, job))

    def _take_back(self) -> None:
        """Connections the threads are done with: closing, or waiting for a request again."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_reader.recv(4096):
                pass
        while True:
            try:
                connection, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
            if not keep or self._stop.is_set():
                self._linger(connection)
                continue
            connection.request_since = None
            connection.idle_since = time.monotonic()
            self._idle[connection] = None
            self._take_request(connection)  # a pipelined request may be here already
            self._listen(True)

    def _expire(self, now: float) -> None:
        limits = self.site.limits
        for connection in list(self._idle):
            if now - connection.idle_since < limits.idle_timeout_s:
                break
            self._close(connection)
        for connection in list(self._reading):
            if now - (connection.request_since or now) < limits.header_timeout_s:
                break
            self._linger(connection, _plain_answer(408, "the request's headers stopped coming"))
        for connection, until in list(self._lingering.items()):
            if until > now:
                break
            self._close(connection)
        if not self._listening and (self._open < limits.max_connections or self._idle):
            self._listen(True)

    def _linger(self, connection: _Connection, answer: bytes = b"") -> None:
        """Closes a connection after ``answer`` (sent without waiting: it is short), once
        the client has closed its side or within LINGER_S: what it still sends meanwhile
        is read and dropped, as nginx does, since closing with unread data would reset
        the connection, and the client might lose the answer."""
        self._idle.pop(connection, None)
        self._reading.pop(connection, None)
        try:
            if answer:
                connection.sock.send(answer)
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        self._lingering[connection] = time.monotonic() + LINGER_S

    def _close(self, connection: _Connection) -> None:
        self._idle.pop(connection, None)
        self._reading.pop(connection, None)
        self._lingering.pop(connection, None)
        self._selector.unregister(connection.sock)
        connection.sock.close()
        self._open -= 1
        self._listen(True)

    def _wake(self) -> None:
        # Full: the loop has wake-ups waiting already; closed: it is done.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    # -- the threads ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            connection, request = job
            keep = False
            try:
                connection.sock.settimeout(self.site.limits.body_timeout_s)
                if isinstance(request, _Refused):
                    # Not a request one can answer in kind (HTTP/1.0, HEAD): plainly, and closed.
                    _Exchange(self.site, connection, _UNPARSED).answer_refused(request)
                else:
                    exchange = _Exchange(self.site, connection, request)
                    keep = exchange.answer()
                    if self.site.verbose:
                        # Request lines carry study UIDs: logged only when asked for.
                        _log(f'"{request.method} {request.target}" {exchange.status}')
            except Exception as error:  # no request may end in a traceback
                if not isinstance(error, OSError):  # a client gone, or too slow
                    _log(f"a request's connection: {type(error).__name__}")
            finally:
                with contextlib.suppress(OSError):
                    connection.sock.setblocking(False)
                self._returned.put((connection, keep))
                self._wake()


def make_server(
    dist: Path,
    config: Path,
    dicomweb: str,
    host: str = "127.0.0.1",
    port: int = 3001,
    timeout_s: float = 60.0,
    verbose: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    limits: Limits | None = None,
) -> Server:
    """The server, bound and not yet serving; ``dicomweb`` is the DICOMweb root
    (``http://host:port/dicom-web``); ``allowed_hosts``, Host headers it answers besides
    ``127.0.0.1:<port>``, ``localhost:<port>`` and ``host:<port>``."""
    dist = dist.resolve()
    if not (dist / "index.html").is_file():
        raise SystemExit(f"--dist {dist}: no index.html there (OHIF's built dist/ folder)")
    if not config.is_file():
        raise SystemExit(f"--config {config}: no such file")
    upstream = urllib.parse.urlsplit(dicomweb)
    if upstream.scheme != "http" or not upstream.hostname:
        raise SystemExit(f"--dicomweb {dicomweb}: an http:// URL of a DICOMweb root")
    limits = limits or Limits()
    for name in ("threads", "max_connections", "max_body_bytes"):
        if getattr(limits, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: at least 1")
    for name in ("idle_timeout_s", "header_timeout_s", "body_timeout_s"):
        if not getattr(limits, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')}: more than 0")
    site = _Site(dist, config.resolve(), upstream, timeout_s, verbose, frozenset(), limits)
    server = Server(site, host, port)
    # The names a browser reaches it by (port 0 binds one: known from here on).
    bound = server.server_address[1]
    names = [f"127.0.0.1:{bound}", f"localhost:{bound}", *allowed_hosts]
    if host not in ("", "0.0.0.0", "::"):
        names.append(f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}")
    if bound == 80:  # a browser leaves the default port out
        names += [name.rsplit(":", 1)[0] for name in names]
    server.site = dataclasses.replace(site, allowed_hosts=frozenset(n.lower() for n in names))
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, required=True, help="OHIF's built dist/ folder")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(__file__).with_name("app-config.js"),
        help="OHIF's app-config.js (default: the one beside this file)",
    )
    parser.add_argument(
        "--dicomweb",
        default="http://127.0.0.1:8042/dicom-web",
        help="the DICOMweb root passed through at /dicom-web (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=3001, help="default: %(default)s")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME[:PORT]",
        help="a Host header to answer, as a browser writes it (repeatable); "
        "127.0.0.1:<port>, localhost:<port> and --host:<port> always are",
    )
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per DICOMweb request")
    defaults = Limits()
    for name, kind, help in (
        ("threads", int, "requests answered at once"),
        ("max-connections", int, "open connections; an idle one makes room for a new one"),
        ("idle-timeout-s", float, "how long a connection may wait for a request"),
        ("header-timeout-s", float, "from a request's first byte to its last header"),
        ("body-timeout-s", float, "between two reads of a body, or writes of an answer"),
        ("max-body-bytes", int, "the largest STOW-RS body"),
    ):
        default = getattr(defaults, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help} ({default})")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    limits = Limits(
        threads=args.threads,
        max_connections=args.max_connections,
        idle_timeout_s=args.idle_timeout_s,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        max_body_bytes=args.max_body_bytes,
    )
    server = make_server(
        args.dist,
        args.config,
        args.dicomweb,
        args.host,
        args.port,
        args.timeout_s,
        args.verbose,
        tuple(args.allowed_host),
        limits,
    )
    host, port = server.server_address[:2]
    print(f"OHIF on http://{host}:{port}/ (DICOMweb from {args.dicomweb})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
