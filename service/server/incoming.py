"""One connection's requests as they arrive, without a socket: bytes in, steps out.

h11 parses HTTP/1.1; this module adds what must be decided before a request is
handed to the application, in the order a client's bytes allow it:

- once the headers are in: the HTTP version, the target's and the headers' size,
  both framings at once (Content-Length with Transfer-Encoding: the request-smuggling
  shape), a declared body over ``max_body_bytes``, and room in the worker's buffers;
- while a body arrives: its size, and what the chunk being read announces, and room again;
- a protocol error from h11 becomes the JSON error envelope, not HTML.

The worker's event loop feeds ``receive`` and acts on ``next_step``: NEED_DATA,
HEADERS (start the body's clocks; send ``continue_100`` if the client waits for it),
COMPLETE (hand ``take_body`` to a request thread), CLOSED, or a ``Refusal`` to answer
with ``Refusal.response`` before closing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import h11

from service.contract.errors import ErrorBody, ErrorCode, ErrorResponse
from service.contract.responses import to_json
from service.server.buffers import Reservation

# Request line and headers together (431 past it), and the target alone (414).
HEADER_LIMIT_BYTES = 32 * 1024
TARGET_LIMIT_BYTES = 8 * 1024

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def error_body(code: ErrorCode, message: str) -> bytes:
    """The service's JSON error envelope."""
    return to_json(ErrorResponse(error=ErrorBody(code=code, message=message)))


class Step(enum.Enum):
    NEED_DATA = "need data"
    HEADERS = "headers"  # accepted; the body (if any) follows
    COMPLETE = "complete"  # headers and body are in: the request can be handled
    CLOSED = "closed"  # the client closed its side between requests


@dataclass(frozen=True)
class Refusal:
    """A request the worker answers itself (with ``code``'s status) and then closes."""

    code: ErrorCode
    message: str
    retry_after_s: int | None = None

    @property
    def status(self) -> int:
        return self.code.status

    def body(self) -> bytes:
        return error_body(self.code, self.message)

    def response(self) -> bytes:
        """The whole answer, written raw: h11 will not answer after a client's protocol
        error, and the connection closes after it anyway."""
        body = self.body()
        headers = [
            (b"Content-Type", b"application/json"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Connection", b"close"),
        ]
        if self.retry_after_s is not None:
            headers.append((b"Retry-After", str(self.retry_after_s).encode()))
        headers.append((b"Content-Length", str(len(body)).encode()))
        status_line = f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
        return (
            status_line.encode()
            + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            + b"\r\n"
            + body
        )


class Incoming:
    """The request side of one connection: its h11 state, the request being read and
    its body, counted in the worker's buffers through ``reservation``."""

    def __init__(self, max_body_bytes: int, reservation: Reservation) -> None:
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=HEADER_LIMIT_BYTES)
        self.max_body_bytes = max_body_bytes
        self.reservation = reservation
        self.request: h11.Request | None = None
        self.body = bytearray()

    def receive(self, data: bytes) -> None:
        """Bytes from the client (b"" once it has closed its side)."""
        self.http.receive_data(data)

    def next_step(self) -> Step | Refusal:
        """Parse what has arrived, up to the next thing the loop must act on."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as error:
                return _protocol_refusal(error)
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if self.body_announced() > self.max_body_bytes:
                    return self.too_large()
                return Step.NEED_DATA
            if isinstance(event, h11.Request):
                self.request = event
                return self._check_headers(event) or Step.HEADERS
            if isinstance(event, h11.Data):
                refused = self._take_data(event)
                if refused is not None:
                    return refused
            elif isinstance(event, h11.EndOfMessage):
                return Step.COMPLETE
            elif isinstance(event, h11.ConnectionClosed):
                return Step.CLOSED

    def _take_data(self, event: h11.Data) -> Refusal | None:
        """A piece of the body: kept, or the refusal it causes."""
        self.body += event.data
        if self.body_announced() > self.max_body_bytes:
            return self.too_large()
        if not self.reservation.grow_to(len(self.body)):  # chunked: no length
            return self.busy()
        return None

    def body_announced(self) -> int:
        """The body's bytes so far, and what the chunk being read still announces: a chunk
        header of 2^64 - 1 bytes is refused at once, not after a wait for bytes that
        never come. (h11 keeps the chunk's remaining size in its reader, privately; the
        catalogue's test of that chunk fails if a later h11 moves it.)"""
        reader = getattr(self.http, "_reader", None)
        remaining = getattr(reader, "_bytes_in_chunk", 0)
        return len(self.body) + (remaining if isinstance(remaining, int) else 0)

    def _check_headers(self, request: h11.Request) -> Refusal | None:
        if request.http_version not in (b"1.0", b"1.1"):
            return Refusal(
                ErrorCode.HTTP_VERSION_NOT_SUPPORTED, "Only HTTP/1.0 and HTTP/1.1 are served here."
            )
        if len(request.target) > TARGET_LIMIT_BYTES:
            return Refusal(
                ErrorCode.URI_TOO_LONG,
                f"The request target is longer than {TARGET_LIMIT_BYTES} bytes.",
            )
        # h11 bounds headers that arrive in pieces; these arrived in one read.
        size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > HEADER_LIMIT_BYTES:
            return Refusal(
                ErrorCode.HEADERS_TOO_LARGE,
                f"The request line and headers are "
                f"{size} bytes; the limit is {HEADER_LIMIT_BYTES}.",
            )
        length = content_length(request)
        if length is not None and any(k == b"transfer-encoding" for k, _ in request.headers):
            # Two framings: the classic request-smuggling shape, refused outright.
            return Refusal(
                ErrorCode.BAD_REQUEST,
                "The request has both Content-Length and Transfer-Encoding; send one.",
            )
        if length is not None and length > self.max_body_bytes:
            return self.too_large()
        if not self.reservation.grow_to(length or 0):
            return self.busy()
        return None

    def continue_100(self) -> bytes:
        """``100 Continue`` if the client waits for it before sending its body, else b""."""
        if not self.http.they_are_waiting_for_100_continue:
            return b""
        return self.http.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def take_body(self) -> bytearray:
        """The complete body, handed over (the connection keeps no copy)."""
        body, self.body = self.body, bytearray()
        return body

    def next_request(self) -> None:
        """Forget the request just answered (a kept-alive connection waits for another)."""
        self.request, self.body = None, bytearray()

    def too_large(self) -> Refusal:
        return Refusal(
            ErrorCode.REQUEST_TOO_LARGE,
            f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
        )

    @staticmethod
    def busy() -> Refusal:
        return Refusal(
            ErrorCode.OVERLOADED,
            "The server has no room for this request's body "
            "right now (its memory budget or its buffers are taken by other "
            "requests); retry shortly.",
            retry_after_s=1,
        )


def _protocol_refusal(error: h11.RemoteProtocolError) -> Refusal:
    """h11's protocol error in the JSON envelope."""
    code = {
        431: ErrorCode.HEADERS_TOO_LARGE,
        501: ErrorCode.UNSUPPORTED_TRANSFER_ENCODING,
    }.get(error.error_status_hint, ErrorCode.BAD_REQUEST)
    # h11's messages end with the raw bytes (": bytearray(b'...')"): dropped.
    reason = str(error).split(": bytearray(", 1)[0]
    return Refusal(code, f"The request is not valid HTTP/1.1: {reason}.")


def content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one valid number
    return None
