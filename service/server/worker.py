"""The HTTP worker: whole requests in and whole answers out on one event loop;
request threads only ever run the application.

gunicorn's thread worker hands a connection to a request thread as soon as it is
readable, and the thread then blocks on the client: reading a trickled header
or body, or writing an answer the client never reads. As many slow clients as
threads take a worker down, ``/healthz`` included. Here the worker's main thread
does all socket I/O, non-blocking, with h11 parsing HTTP/1.1:

- a request goes to the thread pool only once its headers and body are all in
  memory; an answer is written by the loop after the thread has returned;
- each phase has a clock: the headers must arrive within ``client_timeout_s``,
  a body or an answer may not stall for longer than that nor take longer than
  ``request_timeout_s`` in all, an idle kept-alive connection lasts ``keepalive``
  seconds; a late request gets 408 and the connection is closed;
- bytes held for clients (bodies being received, answers being sent) are
  bounded per worker (4 × ``max_request_bytes``) and counted in the service's memory
  budget (``service.memory``); past either, new requests get 503;
- at most once a second after answers, freed memory goes back to the system
  (glibc's ``malloc_trim``): a big request does not leave the worker big;
- protocol errors (malformed chunks, conflicting lengths, oversized headers,
  unsupported transfer codings) get the JSON error envelope, not HTML;
- on SIGTERM the listening sockets close at once (new connections are refused),
  ``/readyz`` answers 503, requests already started are read, handled and
  answered with ``Connection: close``, within the graceful timeout.

The wait for a request thread is measured too: it shows in
``gradcam_requests_waiting_for_thread`` and the ``thread_wait`` stage, and a
request's deadline counts from when it was queued for a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import io
import logging
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import h11
import orjson
from gunicorn.workers.base import Worker

from service import metrics
from service.errors import ErrorCode
from service.logs import log_failure
from service.memory import MemoryBudget
from service.settings import Settings

logger = logging.getLogger(__name__)

# Request line and headers together (431 past it), and the target alone (414).
HEADER_LIMIT_BYTES = 32 * 1024
TARGET_LIMIT_BYTES = 8 * 1024
# Idle kept-alive connections a stopping worker still serves for, so that a request
# already on the wire is answered (with "Connection: close") rather than reset.
STOP_LINGER_S = 1.0
# How long a refused request's remaining input is read and dropped before closing.
LINGER_S = 2.0
# After answers, freed memory is handed back to the system at most this often.
_TRIM_EVERY_S = 1.0
_READ_CHUNK = 256 * 1024
# Enough of a path for any route; a longer one is cut in the access log.
_LOGGED_PATH_BYTES = 256

_current = threading.local()
_draining = threading.Event()


def thread_wait() -> tuple[float, float] | None:
    """For the request this thread handles: when it was queued for a thread
    (``time.monotonic()``) and how long it waited for one; None outside this worker."""
    value: tuple[float, float] | None = getattr(_current, "wait", None)
    return value


def draining() -> bool:
    """True once this worker has been told to stop (``/readyz`` then answers 503)."""
    return _draining.is_set()


@dataclass
class _Answer:
    """What a request thread hands back to the loop."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    started: float
    request_id: str = "-"


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    port: int
    http: h11.Connection
    phase: str = "idle"  # idle → reading → handling → writing → idle …, or → lingering
    deadline: float = 0.0  # the clock of the current phase (see _sweep)
    limit: float = 0.0  # a phase's overall limit, beyond the stall clock
    request: h11.Request | None = None
    body: bytearray = field(default_factory=bytearray)
    reserved: int = 0  # bytes counted against the worker's buffer budget
    out: memoryview | None = None
    answer: _Answer | None = None
    registered: int = 0  # selector events now watched


def _error_body(code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: hands freed heap back to the system (else a big
    request leaves the worker gigabytes larger for ever); a no-op elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


class BufferingWorker(Worker):
    """A gunicorn worker class: ``worker_class = "service.server.worker.BufferingWorker"``."""

    def init_process(self) -> None:
        self.settings = Settings.from_env()
        self.client_timeout_s = self.settings.client_timeout_s
        self.buffer_budget = 4 * self.settings.max_request_bytes
        self.buffered = 0
        self.memory = MemoryBudget.from_env()
        self.connections: dict[int, _Connection] = {}
        self.selector = selectors.DefaultSelector()
        self.finished: queue.SimpleQueue[tuple[_Connection, _Answer]] = queue.SimpleQueue()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.threads),
                                       thread_name_prefix="request")
        self.trim = _malloc_trim()
        self.trim_due = False
        self.trimmed_at = 0.0
        self.accepting = False
        self.accept_paused_until = 0.0
        super().init_process()

    # --- signals ------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop accepting and drain (the loop does the work)."""
        self.alive = False
        _draining.set()

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.selector.register(self.wake_reader, selectors.EVENT_READ, self._on_wake)
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, self._on_signal_pipe)
        for listener in self.sockets:
            listener.setblocking(False)
        # Read once: the listeners close on SIGTERM while requests are still served.
        address = self.sockets[0].getsockname() if self.sockets else ("", 0)
        self.server_name, self.server_port = ((str(address[0]), str(address[1]))
                                              if isinstance(address, tuple) else ("unix", "0"))
        self._set_accepting(True)
        while self.alive:
            self.notify()
            self._set_accepting(len(self.connections) < self.cfg.worker_connections
                                and time.monotonic() >= self.accept_paused_until)
            self._turn(1.0)
            if os.getppid() != self.ppid:
                self.log.info("Parent changed, shutting down: %s", self)
                break
        self._drain()

    def _drain(self) -> None:
        _draining.set()
        self._set_accepting(False)
        for listener in self.sockets:
            listener.close()  # with the master's copy closed too, connections are refused
        linger = time.monotonic() + STOP_LINGER_S
        for conn in list(self.connections.values()):
            if conn.phase == "idle":
                conn.deadline = min(conn.deadline, linger)
        give_up = time.monotonic() + self.cfg.graceful_timeout
        while self.connections and time.monotonic() < give_up:
            self.notify()
            self._turn(0.2)
        for conn in list(self.connections.values()):
            self._close(conn)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _turn(self, timeout: float) -> None:
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            try:
                key.data(key.fileobj, mask)
            except Exception as error:  # one connection's trouble never ends the loop
                log_failure(logger, "error in the HTTP event loop", error)
                conn = self.connections.get(key.fd)
                if conn is not None:
                    self._close(conn)
        self._sweep()
        now = time.monotonic()
        if self.trim_due and now - self.trimmed_at >= _TRIM_EVERY_S:
            # A request's temporaries (decoded images, pictures, JSON) can reach hundreds
            # of MB; glibc keeps the freed pages unless asked. A few ms, once a second.
            self.trim()
            self.trim_due, self.trimmed_at = False, now

    def _set_accepting(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        for listener in self.sockets:
            if enabled:
                self.selector.register(listener, selectors.EVENT_READ, self._on_accept)
            else:
                self.selector.unregister(listener)
        self.accepting = enabled

    def _on_signal_pipe(self, fileobj: Any, mask: int) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except BlockingIOError:
            pass

    def _on_accept(self, listener: Any, mask: int) -> None:
        for _ in range(64):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    # Out of descriptors: the listener stays readable, so pause accepting
                    # (the kernel keeps the backlog) instead of spinning on it.
                    self.accept_paused_until = time.monotonic() + 0.5
                    self._set_accepting(False)
                    self.log.warning("out of file descriptors: accepting again in 0.5 s")
                    return
                if error.errno == errno.ECONNABORTED:
                    continue
                raise
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer, port = (address[0], address[1]) if isinstance(address, tuple) else ("", 0)
            conn = _Connection(sock, peer, port, h11.Connection(
                h11.SERVER, max_incomplete_event_size=HEADER_LIMIT_BYTES))
            self.connections[sock.fileno()] = conn
            self._await_request(conn, time.monotonic() + self.client_timeout_s)

    # --- reading ------------------------------------------------------------------

    def _watch(self, conn: _Connection, events: int) -> None:
        if events == conn.registered:
            return
        if conn.registered and events:
            self.selector.modify(conn.sock, events, self._on_socket)
        elif events:
            self.selector.register(conn.sock, events, self._on_socket)
        else:
            self.selector.unregister(conn.sock)
        conn.registered = events

    def _await_request(self, conn: _Connection, deadline: float) -> None:
        conn.phase, conn.deadline = "idle", deadline
        conn.request, conn.body = None, bytearray()
        self._watch(conn, selectors.EVENT_READ)

    def _on_socket(self, sock: socket.socket, mask: int) -> None:
        conn = self.connections.get(sock.fileno())
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE and conn.phase == "writing":
            self._send(conn)
        elif mask & selectors.EVENT_READ and conn.phase in ("idle", "reading"):
            self._receive(conn)
        elif mask & selectors.EVENT_READ and conn.phase == "lingering":
            self._discard(conn)

    def _linger(self, conn: _Connection) -> None:
        """Close after a refusal without losing the answer: closing a socket with unread
        input resets the connection, and a reset can overtake the answer to the client.
        So stop sending, and read and drop what still comes for a moment first."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.phase, conn.deadline = "lingering", time.monotonic() + LINGER_S
        self._watch(conn, selectors.EVENT_READ)

    def _discard(self, conn: _Connection) -> None:
        if _recv(conn.sock) == b"":
            self._close(conn)

    def _receive(self, conn: _Connection) -> None:
        data = _recv(conn.sock)
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        now = time.monotonic()
        if conn.phase == "idle":
            # The first byte of a request starts its header clock.
            conn.phase, conn.deadline = "reading", now + self.client_timeout_s
            conn.limit = conn.deadline
        elif conn.request is not None:
            # Receiving a body: each arrival restarts the stall clock.
            conn.deadline = min(now + self.client_timeout_s, conn.limit)
        conn.http.receive_data(data)
        self._parse(conn)

    def _parse(self, conn: _Connection) -> None:
        while True:
            try:
                event = conn.http.next_event()
            except h11.RemoteProtocolError as error:
                code = {431: ErrorCode.HEADERS_TOO_LARGE,
                        501: ErrorCode.UNSUPPORTED_TRANSFER_ENCODING}.get(
                    error.error_status_hint, ErrorCode.BAD_REQUEST)
                # h11's messages end with the raw bytes (": bytearray(b'...')"): dropped.
                reason = str(error).split(": bytearray(", 1)[0]
                self._refuse(conn, code, f"The request is not valid HTTP/1.1: {reason}.")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if not self._start_request(conn, event):
                    return
            elif isinstance(event, h11.Data):
                conn.body += event.data
                if len(conn.body) > self.settings.max_request_bytes:
                    self._refuse_too_large(conn)
                    return
                if not self._reserve(conn, len(conn.body)):  # a chunked body, no length
                    self._refuse_busy(conn)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close(conn)
                return

    def _start_request(self, conn: _Connection, request: h11.Request) -> bool:
        """Headers complete: check what can be checked before any body is read."""
        conn.request = request
        now = time.monotonic()
        conn.deadline = now + self.client_timeout_s
        conn.limit = now + self.settings.request_timeout_s
        if request.http_version not in (b"1.0", b"1.1"):
            self._refuse(conn, ErrorCode.HTTP_VERSION_NOT_SUPPORTED,
                         "Only HTTP/1.0 and HTTP/1.1 are served here.")
            return False
        if len(request.target) > TARGET_LIMIT_BYTES:
            self._refuse(conn, ErrorCode.URI_TOO_LONG, f"The request target is longer than "
                         f"{TARGET_LIMIT_BYTES} bytes.")
            return False
        # h11 bounds headers that arrive in pieces; these arrived in one read.
        size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > HEADER_LIMIT_BYTES:
            self._refuse(conn, ErrorCode.HEADERS_TOO_LARGE, f"The request line and headers are "
                         f"{size} bytes; the limit is {HEADER_LIMIT_BYTES}.")
            return False
        length = _content_length(request)
        if length is not None and any(k == b"transfer-encoding" for k, _ in request.headers):
            # Two framings: the classic request-smuggling shape, refused outright.
            self._refuse(conn, ErrorCode.BAD_REQUEST, "The request has both Content-Length and "
                         "Transfer-Encoding; send one.")
            return False
        if length is not None and length > self.settings.max_request_bytes:
            self._refuse_too_large(conn)
            return False
        if not self._reserve(conn, length or 0):
            self._refuse_busy(conn)
            return False
        if conn.http.they_are_waiting_for_100_continue:
            self._send_now(conn, conn.http.send(h11.InformationalResponse(
                status_code=100, headers=[])) or b"")
        return True

    def _reserve(self, conn: _Connection, size: int, force: bool = False) -> bool:
        """Count ``size`` bytes for ``conn`` against the worker's buffer budget and the
        service's memory budget (``force``: bytes already made, counted regardless)."""
        extra = max(0, size - conn.reserved)
        if not extra:
            return True
        if not force and self.buffered + extra > self.buffer_budget:
            return False
        if self.memory is not None and not self.memory.try_reserve(extra, force):
            return False
        self.buffered += extra
        conn.reserved += extra
        return True

    def _release(self, conn: _Connection) -> None:
        if self.memory is not None:
            self.memory.release(conn.reserved)
        self.buffered -= conn.reserved
        conn.reserved = 0

    # --- handling -----------------------------------------------------------------

    def _dispatch(self, conn: _Connection) -> None:
        conn.phase = "handling"
        self._watch(conn, 0)
        metrics.WAITING_FOR_THREAD.inc()
        queued = time.monotonic()
        environ = self._environ(conn)
        future = self.pool.submit(self._handle, environ, queued)
        future.add_done_callback(lambda done: self._finished(conn, done))

    def _finished(self, conn: _Connection, done: Future[_Answer]) -> None:
        """In the request thread: pass the answer to the loop and wake it. Every
        request gets one, or its connection would wait for ever."""
        if done.cancelled() or done.exception() is not None:
            answer = _failed(time.monotonic())
        else:
            answer = done.result()
        self.finished.put((conn, answer))
        # A full wake socket means the loop is already due to wake.
        with contextlib.suppress(BlockingIOError):
            self.wake_writer.send(b"\0")

    def _on_wake(self, sock: socket.socket, mask: int) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                conn, answer = self.finished.get_nowait()
            except queue.Empty:
                return
            if self.connections.get(conn.sock.fileno()) is conn:
                self._respond(conn, answer)

    def _environ(self, conn: _Connection) -> dict[str, Any]:
        request = conn.request
        assert request is not None
        path, _, query = bytes(request.target).partition(b"?")
        if not path.startswith(b"/"):  # absolute-form: http://host/path
            path = b"/" + path.split(b"://", 1)[-1].partition(b"/")[2]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method.decode("ascii"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": self.server_name,
            "SERVER_PORT": self.server_port,
            "SERVER_PROTOCOL": f"HTTP/{request.http_version.decode('ascii')}",
            "REMOTE_ADDR": conn.peer,
            "REMOTE_PORT": str(conn.port),
            "CONTENT_LENGTH": str(len(conn.body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(conn.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            # The body is complete and de-chunked: read it to its end, whatever the headers.
            "wsgi.input_terminated": True,
            # The client-disconnect probe (routes.py) peeks at it.
            "gunicorn.socket": conn.sock,
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
        conn.body = bytearray()  # the environ's copy is the one that lives on
        return environ

    def _handle(self, environ: dict[str, Any], queued: float) -> _Answer:
        """In a request thread: run the app on a complete request."""
        metrics.WAITING_FOR_THREAD.dec()
        started = time.monotonic()
        _current.wait = (queued, started - queued)
        status_line: list[str] = []
        headers: list[tuple[str, str]] = []

        def start_response(status: str, response_headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            status_line[:] = [status]
            headers[:] = response_headers
            return chunks.append

        chunks: list[bytes] = []
        try:
            result: Iterable[bytes] = self.wsgi(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            code, _, reason = status_line[0].partition(" ")
            request_id = next((v for k, v in headers if k.lower() == "x-request-id"), "-")
            return _Answer(int(code), reason.encode("latin-1"),
                           [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                           b"".join(chunks), started, request_id)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # e.g. a native library's panic: still an answer
            log_failure(logger, "the application failed outside its error handlers", error)
            return _failed(started)
        finally:
            _current.wait = None
            environ.clear()

    # --- writing ------------------------------------------------------------------

    def _respond(self, conn: _Connection, answer: _Answer) -> None:
        headers = [(k, v) for k, v in answer.headers
                   if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")]
        headers.append((b"Content-Length", str(len(answer.body)).encode()))
        if not self.alive:
            headers.append((b"Connection", b"close"))
        request = conn.request
        head = request is not None and request.method == b"HEAD"
        try:
            data = conn.http.send(h11.Response(status_code=answer.status, reason=answer.reason,
                                               headers=headers)) or b""
            if answer.body and not head:
                data += conn.http.send(h11.Data(data=answer.body)) or b""
            data += conn.http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            logger.exception("the application's answer is not valid HTTP")
            self._close(conn)
            return
        conn.answer = answer
        self._write(conn, data)

    def _write(self, conn: _Connection, data: bytes) -> None:
        self._release(conn)
        self._reserve(conn, len(data), force=True)  # held until sent: it is already made
        now = time.monotonic()
        conn.phase, conn.out = "writing", memoryview(data)
        conn.deadline = now + self.client_timeout_s
        conn.limit = now + self.settings.request_timeout_s
        self._send(conn)

    def _send(self, conn: _Connection) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent:
            conn.out = conn.out[sent:]
            conn.deadline = min(time.monotonic() + self.client_timeout_s, conn.limit)
        if len(conn.out):
            self._watch(conn, selectors.EVENT_WRITE)
            return
        self._sent(conn)

    def _sent(self, conn: _Connection) -> None:
        conn.out = None
        self._log_access(conn)
        conn.answer = None
        self._release(conn)
        self.trim_due = True
        if conn.http.their_state is not h11.DONE:
            self._linger(conn)  # a refusal: the client may still be sending
            return
        if conn.http.our_state is not h11.DONE or not self.alive:
            self._close(conn)
            return
        conn.http.start_next_cycle()
        self._await_request(conn, time.monotonic() + self.cfg.keepalive)
        self._parse(conn)  # a pipelined request may already be buffered

    def _send_now(self, conn: _Connection, data: bytes) -> None:
        """Best effort for a few bytes (100 Continue, an error): never waits."""
        with contextlib.suppress(OSError):
            conn.sock.send(data)

    def _refuse(self, conn: _Connection, code: ErrorCode, message: str,
                retry_after_s: int | None = None) -> None:
        """Answer a request the loop itself rejects (with ``code``'s status), then close the
        connection."""
        status = code.status
        metrics.ERRORS.labels(code).inc()
        headers = [(b"Content-Type", b"application/json"), (b"Connection", b"close")]
        if retry_after_s is not None:
            headers.append((b"Retry-After", str(retry_after_s).encode()))
        body = _error_body(code, message)
        headers.append((b"Content-Length", str(len(body)).encode()))
        status_line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n".encode()
        head = status_line + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
        self.log.warning("refused a request from %s: %s %s", conn.peer, status, code)
        conn.answer = _Answer(status, b"", [], body, time.monotonic())
        # Written raw (h11 will not answer after a client's protocol error); h11's state
        # is not DONE afterwards, so _sent closes the connection.
        self._watch(conn, 0)
        self._write(conn, head + body)

    def _refuse_too_large(self, conn: _Connection) -> None:
        self._refuse(conn, ErrorCode.REQUEST_TOO_LARGE, "The request body is larger than the "
                     f"limit of {self.settings.max_request_bytes} bytes.")

    def _refuse_busy(self, conn: _Connection) -> None:
        self._refuse(conn, ErrorCode.OVERLOADED, "The server has no room for this request's body "
                     "right now (its memory budget or its buffers are taken by other "
                     "requests); retry shortly.", retry_after_s=1)

    def _close(self, conn: _Connection) -> None:
        if self.connections.get(conn.sock.fileno()) is conn:
            del self.connections[conn.sock.fileno()]
        self._release(conn)
        if conn.registered:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.registered = 0
        conn.sock.close()

    # --- clocks -------------------------------------------------------------------

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections.values()):
            if conn.deadline > now or conn.phase == "handling":
                continue
            if conn.phase == "reading":
                self._refuse(conn, ErrorCode.REQUEST_TIMEOUT,
                             "The request did not arrive in time (headers within "
                             f"{self.client_timeout_s:g} s, a body without a pause that long "
                             f"and within {self.settings.request_timeout_s:g} s in all).")
            else:
                self._close(conn)  # idle, lingering, or an answer the client stopped reading

    def _log_access(self, conn: _Connection) -> None:
        answer, request = conn.answer, conn.request
        if answer is None or not self.cfg.accesslog:
            return
        # The path only: a query string may carry a token (?access_token=) or other data.
        target = (bytes(request.target).partition(b"?")[0][:_LOGGED_PATH_BYTES]
                  .decode("latin-1") if request is not None else "-")
        method = metrics.http_method(request.method.decode("ascii")) if request else "-"
        milliseconds = round((time.monotonic() - answer.started) * 1000)
        self.log.access_log.info('%s "%s %s" %s %s %sms id=%s', conn.peer, method, target,
                                 answer.status, len(answer.body), milliseconds,
                                 answer.request_id)


_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            414: "URI Too Long", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}


def _recv(sock: socket.socket) -> bytes | None:
    """What the socket has now: None if nothing yet, b"" once closed or broken."""
    try:
        return sock.recv(_READ_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _failed(started: float) -> _Answer:
    return _Answer(500, b"Internal Server Error", [(b"Content-Type", b"application/json")],
                   _error_body(ErrorCode.INTERNAL, "The server failed to handle this request; "
                               "it has been logged."), started)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one valid number
    return None
