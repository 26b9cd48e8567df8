"""One HTTP worker's connection to one engine process: requests out, replies back.

Each worker holds one ``EngineConnection`` per engine process (one per device):
one Unix socket, a lock for writes, and one reader thread that matches replies to
the waiting request threads by id. Request threads only encode, send and wait
on a future; they never touch torch.

When an engine dies its socket reaches EOF at once: every request waiting on it
fails with ``EngineUnavailable`` (503) right away, new ones get the same answer
until the restarted engine accepts the reconnection (the reader retries every
``_RECONNECT_S``). An engine that is alive but does not run (stopped, wedged) keeps
its socket open: its heartbeat (``service.transport.heartbeat``) goes stale instead, and then
new requests get the same 503 at once, and the reader fails those waiting, until
the beat comes back or the supervisor replaces the engine (``engine_liveness``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any

import numpy as np

from service.contract.errors import EngineUnavailable, ServiceError
from service.logs import log_failure
from service.transport import ipc
from service.transport.engine_liveness import EngineLiveness
from service.transport.heartbeat import BEAT_EVERY_S, Heartbeat, heartbeat_path
from service.transport.interface import Catalog, Job, JobResult

logger = logging.getLogger(__name__)

_RECONNECT_S = 0.1
_HELLO_ID = 0


class EngineConnection:
    """One worker's connection to one engine process."""

    def __init__(self, path: str, heartbeat_timeout_s: float = 1.5) -> None:
        self.path = path
        # Its heartbeat and last reply: is the engine running (engine_liveness.py)?
        self._liveness = EngineLiveness(path, heartbeat_timeout_s)
        self.catalog: Catalog | None = None
        self.engine_pid: int | None = None
        self._sock: socket.socket | None = None
        self._state = threading.Lock()
        self._send_lock = threading.Lock()
        # id → (kind, future); kind "job" decodes a JobResult, "header" returns the header.
        self._pending: dict[int, tuple[str, Future[Any]]] = {}
        self._ids = itertools.count(1)
        self._connected = threading.Event()
        self._closed = False
        self._reader = threading.Thread(
            target=self._run, name=f"gradcam-engine-{path}", daemon=True
        )
        self._reader.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def responsive(self) -> bool:
        """Connected, and its engine's heartbeat is fresh (or a reply came as recently:
        an engine that answers is alive, whatever delayed its beat)."""
        return self._connected.is_set() and self._liveness.fresh()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # --- request threads -------------------------------------------------------

    def submit(self, job: Job, deadline: float) -> Future[JobResult]:
        request_id, future = self._register("job")
        try:
            buffers = ipc.encode_job(request_id, job, deadline)
        except BaseException:
            self._forget(request_id)
            raise
        self._send(request_id, buffers)
        future.add_done_callback(lambda f: self._cancel_in_engine(request_id, f))
        return future

    def request(self, op: str, timeout_s: float) -> dict[str, Any]:
        """A small request/reply (``ping``); ``EngineUnavailable`` on no answer."""
        request_id, future = self._register("header")
        self._send(request_id, ipc.encode({"op": op, "id": request_id}))
        try:
            answer: dict[str, Any] = future.result(timeout_s)
            return answer
        except TimeoutError:
            self._forget(request_id)
            raise EngineUnavailable(
                f"The engine did not answer '{op}' within {timeout_s:g} s."
            ) from None

    def _register(self, kind: str) -> tuple[int, Future[Any]]:
        future: Future[Any] = Future()
        with self._state:
            if not self._connected.is_set():
                raise EngineUnavailable(
                    "The engine is not running (starting, or restarting "
                    "after a failure); retry shortly."
                )
            if kind == "job" and not self.responsive:
                raise self._liveness.hung_error()
            request_id = next(self._ids)
            self._pending[request_id] = (kind, future)
        return request_id, future

    def _send(self, request_id: int, buffers: list[memoryview]) -> None:
        try:
            self._write(buffers, ipc.SEND_TIMEOUT_S)
        except ipc.PeerGone:
            self._forget(request_id)
            raise EngineUnavailable("The engine connection broke; retry shortly.") from None

    def _write(self, buffers: list[memoryview], timeout_s: float) -> None:
        """One whole message on the current connection, or ``PeerGone`` (and the
        connection is failed: a half-written message would corrupt the stream)."""
        with self._send_lock:
            sock = self._sock
            if sock is None:
                raise ipc.PeerGone("not connected")
            try:
                ipc.send_message(sock, buffers, timeout_s)
            except ipc.PeerGone as error:
                self._fail_connection(sock, f"send failed: {error}")
                raise

    def _forget(self, request_id: int) -> None:
        with self._state:
            self._pending.pop(request_id, None)

    def _cancel_in_engine(self, request_id: int, future: Future[Any]) -> None:
        """A request that stopped waiting (deadline, client gone): the engine may skip it."""
        if not future.cancelled():
            return
        self._forget(request_id)
        with contextlib.suppress(ipc.PeerGone):
            self._write(ipc.encode({"op": "cancel", "id": request_id}), 1.0)

    # --- the reader thread -----------------------------------------------------

    def _run(self) -> None:
        logged_down = False
        while not self._closed:
            try:
                sock = ipc.connect(self.path)
            except OSError:
                if not logged_down:
                    logger.info("engine %s: waiting for it to accept connections", self.path)
                    logged_down = True
                time.sleep(_RECONNECT_S)
                continue
            logged_down = False
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ipc.SOCKET_BUFFER_BYTES)
            try:
                self._serve(sock)
            finally:
                # Only this thread closes the socket: others just shut it down, so no
                # descriptor is closed (and its number reused) under a thread using it.
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        """Read replies from one connection until it breaks; then fail what waits on it."""
        reader = ipc.MessageReader()
        hello: Future[Any] = Future()
        with self._state:
            self._sock = sock
            self._pending[_HELLO_ID] = ("header", hello)
        reason = "the engine closed the connection"
        try:
            self._write(ipc.encode({"op": "hello", "id": _HELLO_ID}), ipc.SEND_TIMEOUT_S)
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            greeted = False
            while not self._closed and not reader.eof and self._sock is sock:
                if not poller.poll(round(BEAT_EVERY_S * 1000)):
                    if greeted and not self.responsive:
                        self._fail_waiting_jobs()
                    continue
                for header, frames in reader.read(sock):
                    self._dispatch(header, frames)
                if not greeted and hello.done():
                    if hello.exception() is not None:
                        raise ipc.ProtocolError(f"hello refused: {hello.exception()}")
                    greeted = self._greet(sock, hello.result())
        except (ipc.PeerGone, ipc.ProtocolError) as error:
            reason = str(error)
        except Exception as error:  # a bug must not leave requests waiting on a dead reader
            log_failure(logger, f"engine {self.path}: reader failed", error)
            reason = f"reader failed ({type(error).__name__})"
        self._fail_connection(sock, reason)

    def _fail_waiting_jobs(self) -> None:
        """The engine stopped beating: what waits on it gets 503 now, not at its deadline
        (the engine is told to skip them, should it run again)."""
        with self._state:
            jobs = [(rid, f) for rid, (kind, f) in self._pending.items() if kind == "job"]
            for request_id, _ in jobs:
                del self._pending[request_id]
        if not jobs:
            return
        logger.warning(
            "engine %s: no heartbeat for %.1f s; %d waiting request(s) failed",
            self.path,
            self._liveness.heartbeat.age_s() if self._liveness.heartbeat else -1.0,
            len(jobs),
        )
        failure = self._liveness.hung_error()
        for request_id, future in jobs:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(failure)
            with contextlib.suppress(ipc.PeerGone):
                self._write(ipc.encode({"op": "cancel", "id": request_id}), 0.05)

    def _greet(self, sock: socket.socket, header: dict[str, Any]) -> bool:
        catalog = Catalog.from_dict(header["catalog"])
        heartbeat = Heartbeat.open(heartbeat_path(self.path))
        with self._state:
            if self._sock is not sock:
                return False  # failed meanwhile
            self.catalog = catalog
            self.engine_pid = int(header["pid"])
            # The old map is left to the garbage collector: a thread may be reading it.
            self._liveness.heartbeat = heartbeat
            self._connected.set()
        logger.info(
            "engine %s: connected (pid %d, %s)", self.path, self.engine_pid, header.get("device")
        )
        return True

    def _dispatch(self, header: dict[str, Any], frames: list[np.ndarray]) -> None:
        self._liveness.replied_at = time.monotonic()
        with self._state:
            entry = self._pending.pop(int(header.get("id", -1)), None)
        if entry is None:
            return  # cancelled meanwhile
        kind, future = entry
        try:
            if "error" in header:
                error = ServiceError.from_wire(header["error"])
                with contextlib.suppress(InvalidStateError):
                    future.set_exception(error)
            elif kind == "job":
                with contextlib.suppress(InvalidStateError):
                    future.set_result(ipc.decode_result(header, frames))
            else:
                with contextlib.suppress(InvalidStateError):
                    future.set_result(header)
        except Exception:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(
                    EngineUnavailable(
                        "The engine sent a reply this worker could not read; retry shortly."
                    )
                )
            raise

    def _fail_connection(self, sock: socket.socket, reason: str) -> None:
        """Fail everything waiting on ``sock``, at once, and shut it down (any thread)."""
        with self._state:
            if self._sock is not sock:
                return  # already failed
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._sock = None
            pending = list(self._pending.values())
            self._pending.clear()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if was_connected:
            logger.warning(
                "engine %s: disconnected (%s); %d request(s) failed",
                self.path,
                reason,
                len(pending),
            )
        failure = EngineUnavailable(
            "The engine stopped while this request waited (it is restarting); retry shortly."
        )
        for _, future in pending:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(failure)

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            self._fail_connection(sock, "closing")
        self._reader.join(2)
