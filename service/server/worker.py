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

This module is the loop and its sockets; one connection's reading, handing over
and writing is ``connection_io``. The parts they drive have no sockets and are
tested without them: ``incoming`` (a connection's requests: parsing, limits,
refusals), ``buffers`` (the bytes held for clients), ``wsgi`` (environ, the
application in a request thread, its answer), ``access_log``.
"""

from __future__ import annotations

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gunicorn.workers.base import Worker

from service.contract.errors import ErrorCode
from service.contract.settings import Settings
from service.logs import log_failure
from service.memory import MemoryBudget
from service.server.buffers import BufferBudget
from service.server.connection_io import ClientConnection, ConnectionIO
from service.server.incoming import Incoming, Refusal
from service.server.wsgi import Peer

logger = logging.getLogger(__name__)

# Idle kept-alive connections a stopping worker still serves for, so that a request
# already on the wire is answered (with "Connection: close") rather than reset.
STOP_LINGER_S = 1.0
# After answers, freed memory is handed back to the system at most this often.
_TRIM_EVERY_S = 1.0


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


class BufferingWorker(ConnectionIO, Worker):
    """A gunicorn worker class: ``worker_class = "service.server.worker.BufferingWorker"``.

    The loop is here; what it does for each connection is ``ConnectionIO``'s."""

    def init_process(self) -> None:
        self.settings = Settings.from_env()
        self.client_timeout_s = self.settings.client_timeout_s
        self.buffers = BufferBudget(4 * self.settings.max_request_bytes, MemoryBudget.from_env())
        self.connections = {}  # typed in ConnectionIO, as are the others it uses
        self.selector = selectors.DefaultSelector()
        self.finished = queue.SimpleQueue()
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
        # Set once this worker has been told to stop; each request's environ asks it.
        self.draining = threading.Event()
        super().init_process()

    # --- signals ------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop accepting and drain (the loop does the work)."""
        self.alive = False
        self.draining.set()

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
        self.draining.set()
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
            conn = ClientConnection(
                sock,
                Peer(peer, port, self.server_name, self.server_port),
                Incoming(self.settings.max_request_bytes, self.buffers.reservation()),
            )
            self.connections[sock.fileno()] = conn
            self._await_request(conn, time.monotonic() + self.client_timeout_s)

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
