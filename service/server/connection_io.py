"""A client connection on the HTTP worker's event loop: read, handed over, answered.

The worker (``worker.py``) owns the loop: it accepts connections, runs the selector
and the clocks, and drains on SIGTERM. What happens to one connection between those
is here, as the ``ConnectionIO`` half of the worker class: its bytes are read
without blocking and fed to ``incoming``; a whole request goes to a request thread
(``wsgi.run_app``), whose answer comes back to the loop through the wake socket and
is written without blocking; a refusal is answered, then the connection lingers
before it closes. A connection moves through the phases idle → reading → handling
→ writing → idle …, or → lingering.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h11

from service import metrics
from service.contract.settings import Settings
from service.server.access_log import log_access
from service.server.environ import DRAINING
from service.server.incoming import Incoming, Refusal, Step
from service.server.wsgi import Answer, Peer, environ_for, failed_answer, run_app

logger = logging.getLogger(__name__)

# How long a refused request's remaining input is read and dropped before closing.
LINGER_S = 2.0
_READ_CHUNK = 256 * 1024


@dataclass(eq=False)
class ClientConnection:
    """One client's socket, its requests (``incoming``) and its phase on the loop."""

    sock: socket.socket
    peer: Peer
    incoming: Incoming
    phase: str = "idle"  # idle → reading → handling → writing → idle …, or → lingering
    deadline: float = 0.0  # the clock of the current phase (see the worker's _sweep)
    limit: float = 0.0  # a phase's overall limit, beyond the stall clock
    out: memoryview | None = None
    answer: Answer | None = None
    registered: int = 0  # selector events now watched

    @property
    def http(self) -> h11.Connection:
        return self.incoming.http


class ConnectionIO:
    """The connection handling of ``worker.BufferingWorker``, one connection at a time.

    A half of the worker class, not a class of its own: it works on the worker's
    selector, connections, thread pool and settings, which the worker sets in
    ``init_process`` (or gunicorn's ``Worker`` does), declared here for the type
    checker.
    """

    settings: Settings
    client_timeout_s: float
    connections: dict[int, ClientConnection]
    selector: selectors.BaseSelector
    finished: queue.SimpleQueue[tuple[ClientConnection, Answer]]
    wake_writer: socket.socket
    pool: ThreadPoolExecutor
    trim_due: bool
    draining: threading.Event  # told to stop: each request's environ asks it (environ.py)
    # Set by gunicorn's Worker: running (False once told to stop), its config, its
    # logger, the application.
    alive: bool
    cfg: Any
    log: Any
    wsgi: Any

    # --- reading ------------------------------------------------------------------

    def _watch(self, conn: ClientConnection, events: int) -> None:
        if events == conn.registered:
            return
        if conn.registered and events:
            self.selector.modify(conn.sock, events, self._on_socket)
        elif events:
            self.selector.register(conn.sock, events, self._on_socket)
        else:
            self.selector.unregister(conn.sock)
        conn.registered = events

    def _await_request(self, conn: ClientConnection, deadline: float) -> None:
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

    def _linger(self, conn: ClientConnection) -> None:
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

    def _discard(self, conn: ClientConnection) -> None:
        if _recv(conn.sock) == b"":
            self._close(conn)

    def _receive(self, conn: ClientConnection) -> None:
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

    def _parse(self, conn: ClientConnection) -> None:
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

    def _dispatch(self, conn: ClientConnection) -> None:
        conn.phase = "handling"
        self._watch(conn, 0)
        metrics.WAITING_FOR_THREAD.inc()
        queued = time.monotonic()
        request = conn.incoming.request
        assert request is not None
        environ = environ_for(request, conn.incoming.take_body(), conn.peer, conn.sock)
        environ[DRAINING] = self.draining.is_set
        future = self.pool.submit(self._handle, environ, queued)
        future.add_done_callback(lambda done: self._finished(conn, done))

    def _handle(self, environ: dict[str, Any], queued: float) -> Answer:
        """In a request thread."""
        metrics.WAITING_FOR_THREAD.dec()
        return run_app(self.wsgi, environ, queued)

    def _finished(self, conn: ClientConnection, done: Future[Answer]) -> None:
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

    def _respond(self, conn: ClientConnection, answer: Answer) -> None:
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

    def _write(self, conn: ClientConnection, data: bytes) -> None:
        reservation = conn.incoming.reservation
        reservation.release()
        reservation.grow_to(len(data), force=True)  # held until sent: it is already made
        now = time.monotonic()
        conn.phase, conn.out = "writing", memoryview(data)
        conn.deadline = now + self.client_timeout_s
        conn.limit = now + self.settings.request_timeout_s
        self._send(conn)

    def _send(self, conn: ClientConnection) -> None:
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

    def _sent(self, conn: ClientConnection) -> None:
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

    def _send_now(self, conn: ClientConnection, data: bytes) -> None:
        """Best effort for a few bytes (100 Continue): never waits."""
        if data:
            with contextlib.suppress(OSError):
                conn.sock.send(data)

    def _refuse(self, conn: ClientConnection, refusal: Refusal) -> None:
        """Answer a request the loop itself rejects, then close the connection."""
        metrics.ERRORS.labels(refusal.code).inc()
        self.log.warning(
            "refused a request from %s: %s %s", conn.peer.address, refusal.status, refusal.code
        )
        conn.answer = Answer(refusal.status, b"", [], refusal.body(), time.monotonic())
        # Written raw; h11's state is not DONE afterwards, so _sent closes the connection.
        self._watch(conn, 0)
        self._write(conn, refusal.response())

    def _close(self, conn: ClientConnection) -> None:
        if self.connections.get(conn.sock.fileno()) is conn:
            del self.connections[conn.sock.fileno()]
        conn.incoming.reservation.release()
        if conn.registered:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.registered = 0
        conn.sock.close()


def _recv(sock: socket.socket) -> bytes | None:
    """What the socket has now: None if nothing yet, b"" once closed or broken."""
    try:
        return sock.recv(_READ_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
