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

Only the standard library. It listens on 127.0.0.1 by default and adds no
authentication: whoever reaches it reads the DICOMweb server. The compose profile
``pacs`` does the same with OHIF's own image and nginx (``nginx.conf``).

    python3 deploy/ohif/serve.py --dist .cache/ohif/3.13.2/dist \\
        --dicomweb http://127.0.0.1:8042/dicom-web --port 3001
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import mimetypes
import shutil
import sys
import urllib.parse
from pathlib import Path

PREFIX = "/dicom-web"  # where app-config.js reads DICOMweb, on this origin
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
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


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ohif-serve"
    # Set on the subclass made by make_server().
    dist: Path
    config: Path
    upstream: urllib.parse.SplitResult
    timeout_s: float
    verbose: bool

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_POST(self) -> None:
        # STOW-RS (OHIF can store what a user draws); nothing else is written here.
        if self._is_dicomweb():
            self._proxy()
        else:
            self._plain(405, "only DICOMweb takes POST here")

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _is_dicomweb(self) -> bool:
        path = self._path()
        return path == PREFIX or path.startswith(PREFIX + "/")

    def _route(self, body: bool) -> None:
        path = self._path()
        if self._is_dicomweb():
            self._proxy()
        elif path == "/app-config.js":
            self._file(self.config, body)
        else:
            self._static(path, body)

    def _static(self, path: str, body: bool) -> None:
        relative = urllib.parse.unquote(path).lstrip("/")
        target = (self.dist / relative).resolve()
        if not target.is_relative_to(self.dist):
            self._plain(404, "not found")
        elif target.is_file():
            self._file(target, body)
        elif "." in relative.rsplit("/", 1)[-1]:
            # A missing asset is a 404, not the application (which would not parse as one).
            self._plain(404, "not found")
        else:
            self._file(self.dist / "index.html", body)

    def _file(self, path: Path, body: bool) -> None:
        kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", kind or "application/octet-stream")
        self.send_header("Content-Length", str(size))
        # The configuration and the page change with a deployment; hashed bundles do not.
        if path.name in ("index.html", "app-config.js"):
            self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if body:
            with path.open("rb") as f:
                shutil.copyfileobj(f, self.wfile, _CHUNK_BYTES)

    def _plain(self, status: int, text: str) -> None:
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _proxy(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        target = self.upstream.path.rstrip("/") + split.path[len(PREFIX) :]
        if split.query:
            target += "?" + split.query
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        headers = {
            name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP
        }
        headers.pop("Content-Length", None)
        connection = http.client.HTTPConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port or 80, timeout=self.timeout_s
        )
        try:
            connection.request(self.command, target, body=data, headers=headers)
            answer = connection.getresponse()
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            size = answer.getheader("Content-Length")
            if size is None:
                # Chunked upstream: http.client has undone the chunks; send it whole.
                payload = answer.read()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            else:
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    shutil.copyfileobj(answer, self.wfile, _CHUNK_BYTES)
        except OSError as error:
            # The type only: a message could quote the request (UIDs in the path).
            self.log_error("DICOMweb server: %s", type(error).__name__)
            if not self.wfile.closed:
                self._plain(502, "the DICOMweb server did not answer")
        finally:
            connection.close()

    def log_message(self, format: str, *args: object) -> None:
        # Request lines carry study UIDs: logged only when asked for.
        if self.verbose:
            super().log_message(format, *args)

    def log_error(self, format: str, *args: object) -> None:
        sys.stderr.write(f"ohif-serve: {format % args}\n")


def make_server(
    dist: Path,
    config: Path,
    dicomweb: str,
    host: str = "127.0.0.1",
    port: int = 3001,
    timeout_s: float = 60.0,
    verbose: bool = False,
) -> http.server.ThreadingHTTPServer:
    """The server, bound and not yet serving; ``dicomweb`` is the DICOMweb root
    (``http://host:port/dicom-web``)."""
    dist = dist.resolve()
    if not (dist / "index.html").is_file():
        raise SystemExit(f"--dist {dist}: no index.html there (OHIF's built dist/ folder)")
    if not config.is_file():
        raise SystemExit(f"--config {config}: no such file")
    upstream = urllib.parse.urlsplit(dicomweb)
    if upstream.scheme != "http" or not upstream.hostname:
        raise SystemExit(f"--dicomweb {dicomweb}: an http:// URL of a DICOMweb root")
    handler = type(
        "Handler",
        (_Handler,),
        {
            "dist": dist,
            "config": config.resolve(),
            "upstream": upstream,
            "timeout_s": timeout_s,
            "verbose": verbose,
        },
    )
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
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
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per DICOMweb request")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = make_server(
        args.dist, args.config, args.dicomweb, args.host, args.port, args.timeout_s, args.verbose
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
