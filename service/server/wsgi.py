"""The WSGI side of the HTTP worker: a complete request becomes an environ, the
application runs in a request thread, and its answer comes back whole.

No sockets here: ``environ_for`` builds the environ from h11's request and the body
already in memory, and ``run_app`` collects everything the application returns
into an ``Answer`` that the event loop writes. Whatever the application does, the
loop gets an answer (a 500 in the JSON envelope if it failed outside its own error
handlers), so no connection waits for ever.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import h11

from service.contract.errors import ErrorCode
from service.logs import log_failure
from service.server.environ import THREAD_WAIT
from service.server.incoming import error_body

logger = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Callable[[bytes], None]]], Iterable[bytes]]


@dataclass
class Answer:
    """What a request thread hands back to the loop."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    started: float
    request_id: str = "-"


def failed_answer(started: float) -> Answer:
    return Answer(
        500,
        b"Internal Server Error",
        [(b"Content-Type", b"application/json"), (b"X-Content-Type-Options", b"nosniff")],
        error_body(
            ErrorCode.INTERNAL, "The server failed to handle this request; it has been logged."
        ),
        started,
    )


@dataclass(frozen=True)
class Peer:
    """Both ends of a connection, as the environ names them."""

    address: str
    port: int
    server_name: str
    server_port: str


def environ_for(
    request: h11.Request, body: bytes | bytearray, peer: Peer, sock: object = None
) -> dict[str, Any]:
    """The WSGI environ of a complete request (``body`` de-chunked, all of it)."""
    path, _, query = bytes(request.target).partition(b"?")
    if not path.startswith(b"/"):  # absolute-form: http://host/path
        path = b"/" + path.split(b"://", 1)[-1].partition(b"/")[2]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": peer.server_name,
        "SERVER_PORT": peer.server_port,
        "SERVER_PROTOCOL": f"HTTP/{request.http_version.decode('ascii')}",
        "REMOTE_ADDR": peer.address,
        "REMOTE_PORT": str(peer.port),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        # The body is complete and de-chunked: read it to its end, whatever the headers.
        "wsgi.input_terminated": True,
        # The client-disconnect probe (routes.py) peeks at it.
        "gunicorn.socket": sock,
    }
    for raw_name, raw_value in request.headers:
        name = raw_name.decode("latin-1")
        if "_" in name:
            continue  # would be confused with a "-" header once in the environ
        value = raw_value.decode("latin-1")
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
        elif name not in ("content-length", "transfer-encoding"):
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def run_app(app: WSGIApp, environ: dict[str, Any], queued: float) -> Answer:
    """In a request thread: run ``app`` on a complete request queued at ``queued``."""
    started = time.monotonic()
    environ[THREAD_WAIT] = (queued, started - queued)
    status_line: list[str] = []
    headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        status_line[:] = [status]
        headers[:] = response_headers
        return chunks.append

    try:
        result = app(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        code, _, reason = status_line[0].partition(" ")
        request_id = next((v for k, v in headers if k.lower() == "x-request-id"), "-")
        return Answer(
            int(code),
            reason.encode("latin-1"),
            [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            b"".join(chunks),
            started,
            request_id,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # e.g. a native library's panic: still an answer
        log_failure(logger, "the application failed outside its error handlers", error)
        return failed_answer(started)
    finally:
        environ.clear()
