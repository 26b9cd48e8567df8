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

This module is the loop and its sockets; the parts it drives have none and are
tested without them: ``incoming`` (a connection's requests: parsing, limits,
refusals), ``buffers`` (the bytes held for clients), ``wsgi`` (environ, the
application in a request thread, its answer), ``access_log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h11
from gunicorn.workers.base import Worker

from service import metrics
from service.contract.errors import ErrorCode
from service.contract.settings import Settings
from service.logs import log_failure
from service.memory import MemoryBudget
from service.server.access_log import log_access
from service.server.buffers import BufferBudget
from service.server.incoming import Incoming, Refusal, Step
from service.server.wsgi import Answer, Peer, environ_for, failed_answer, run_app

logger = logging.getLogger(__name__)

# Idle kept-alive connections a stopping worker still serves for, so that a request
# already on the wire is answered (with "Connection: close") rather than reset.
STOP_LINGER_S = 1.0
# How long a refused request's remaining input is read and dropped before closing.
LINGER_S = 2.0
# After answers, freed memory is handed back to the system at most this often.
_TRIM_EVERY_S = 1.0
_READ_CHUNK = 256 * 1024

_draining = threading.Event()


def draining() -> bool:
    """True once this worker has been told to stop (``/readyz`` then answers 503)."""
    return _draining.is_set()


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    incoming: Incoming
    phase: str = "idle"  # idle → reading → handling → writing → idle …, or → lingering
    deadline: float = 0.0  # the clock of the current phase (see _sweep)
    limit: float = 0.0  # a phase's overall limit, beyond the stall clock
    out: memoryview | None = None
    answer: Answer | None = None
    registered: int = 0  # selector events now watched

    @property
    def http(self) -> h11.Connection:
        return self.incoming.http


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
        self.buffers = BufferBudget(4 * self.settings.max_request_bytes, MemoryBudget.from_env())
        self.connections: dict[int, _Connection] = {}
        self.selector = selectors.DefaultSelector()
        self.finished: queue.SimpleQueue[tuple[_Connection, Answer]] = queue.SimpleQueue()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, self.cfg.threads), thread_name_prefix="request"
        )
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
        self.server_name, self.server_port = (
            (str(address[0]), str(address[1])) if isinstance(address, tuple) else ("unix", "0")
        )
        self._set_accepting(True)
        while self.alive:
            self.notify()
            self._set_accepting(
                len(self.connections) < self.cfg.worker_connections
                and time.monotonic() >= self.accept_paused_until
            )
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
            conn = _Connection(
                sock,
                Peer(peer, port, self.server_name, self.server_port),
                Incoming(self.settings.max_request_bytes, self.buffers.reservation()),
            )
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
        conn.incoming.next_request()
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
        elif conn.incoming.request is not None:
            # Receiving a body: each arrival restarts the stall clock.
            conn.deadline = min(now + self.client_timeout_s, conn.limit)
        conn.incoming.receive(data)
        self._parse(conn)

    def _parse(self, conn: _Connection) -> None:
        while True:
            step = conn.incoming.next_step()
            if step is Step.HEADERS:
                # The body's clocks: no stall longer than the client timeout, and the
                # whole request within the request timeout.
                now = time.monotonic()
                conn.deadline = now + self.client_timeout_s
                conn.limit = now + self.settings.request_timeout_s
                self._send_now(conn, conn.incoming.continue_100())
                continue
            if step is Step.COMPLETE:
                self._dispatch(conn)
            elif step is Step.CLOSED:
                self._close(conn)
            elif isinstance(step, Refusal):
                self._refuse(conn, step)
            return

    # --- handling -----------------------------------------------------------------

    def _dispatch(self, conn: _Connection) -> None:
        conn.phase = "handling"
        self._watch(conn, 0)
        metrics.WAITING_FOR_THREAD.inc()
        queued = time.monotonic()
        request = conn.incoming.request
        assert request is not None
        environ = environ_for(request, conn.incoming.take_body(), conn.peer, conn.sock)
        future = self.pool.submit(self._handle, environ, queued)
        future.add_done_callback(lambda done: self._finished(conn, done))

    def _handle(self, environ: dict[str, Any], queued: float) -> Answer:
        """In a request thread."""
        metrics.WAITING_FOR_THREAD.dec()
        return run_app(self.wsgi, environ, queued)

    def _finished(self, conn: _Connection, done: Future[Answer]) -> None:
        """In the request thread: pass the answer to the loop and wake it. Every
        request gets one, or its connection would wait for ever."""
        if done.cancelled() or done.exception() is not None:
            answer = failed_answer(time.monotonic())
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

    # --- writing ------------------------------------------------------------------

    def _respond(self, conn: _Connection, answer: Answer) -> None:
        headers = [
            (k, v)
            for k, v in answer.headers
            if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")
        ]
        headers.append((b"Content-Length", str(len(answer.body)).encode()))
        if not self.alive:
            headers.append((b"Connection", b"close"))
        request = conn.incoming.request
        head = request is not None and request.method == b"HEAD"
        try:
            data = (
                conn.http.send(
                    h11.Response(status_code=answer.status, reason=answer.reason, headers=headers)
                )
                or b""
            )
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
        reservation = conn.incoming.reservation
        reservation.release()
        reservation.grow_to(len(data), force=True)  # held until sent: it is already made
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
        if conn.answer is not None and self.cfg.accesslog:
            log_access(self.log.access_log, conn.peer.address, conn.incoming.request, conn.answer)
        conn.answer = None
        conn.incoming.reservation.release()
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
        """Best effort for a few bytes (100 Continue): never waits."""
        if data:
            with contextlib.suppress(OSError):
                conn.sock.send(data)

    def _refuse(self, conn: _Connection, refusal: Refusal) -> None:
        """Answer a request the loop itself rejects, then close the connection."""
        metrics.ERRORS.labels(refusal.code).inc()
        self.log.warning(
            "refused a request from %s: %s %s", conn.peer.address, refusal.status, refusal.code
        )
        conn.answer = Answer(refusal.status, b"", [], refusal.body(), time.monotonic())
        # Written raw; h11's state is not DONE afterwards, so _sent closes the connection.
        self._watch(conn, 0)
        self._write(conn, refusal.response())

    def _close(self, conn: _Connection) -> None:
        if self.connections.get(conn.sock.fileno()) is conn:
            del self.connections[conn.sock.fileno()]
        conn.incoming.reservation.release()
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
                self._refuse(
                    conn,
                    Refusal(
                        ErrorCode.REQUEST_TIMEOUT,
                        "The request did not arrive in time (headers within "
                        f"{self.client_timeout_s:g} s, a body without a pause that long "
                        f"and within {self.settings.request_timeout_s:g} s in all).",
                    ),
                )
            else:
                self._close(conn)  # idle, lingering, or an answer the client stopped reading


def _recv(sock: socket.socket) -> bytes | None:
    """What the socket has now: None if nothing yet, b"" once closed or broken."""
    try:
        return sock.recv(_READ_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
