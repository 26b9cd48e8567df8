"""The engine process's server: it serves one ``Runtime`` to the HTTP workers over a
Unix socket, with no request threads:

- the **receive loop** (the thread that calls ``serve()``) accepts the workers'
  connections, reassembles their messages (``ipc``) and queues jobs; it writes the
  engine's heartbeat (``service.transport.heartbeat``) several times a second;
- the **model loop** (the ``MicroBatcher``'s thread) runs the batches;
- the **send loop** encodes each finished job's reply and writes it back.

Messages (JSON header + raw frames, see ``ipc``)::

    hello   → {catalog, pid, device}
    ping    → {healthy, queue}          healthy: models loaded, model loop alive
    explain → {targets, counts, timings} + frames [scores (N, K), logits (N, K), maps (M, h, w)]
              or {error: ServiceError.to_wire()}
    cancel    the worker stopped waiting (client gone, deadline): skip the job

``stop()`` stops new work; the model loop finishes what is queued, the replies are
sent, the socket file is removed and ``serve()`` returns. If the send loop dies, the
process exits with ``ENGINE_EXIT_MODEL_LOOP_DIED`` so the supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.contract.errors import Overloaded, ServiceError
from service.engine.runtime import Runtime
from service.logs import log_failure
from service.transport import ipc
from service.transport.heartbeat import BEAT_EVERY_S, Heartbeat, heartbeat_path
from service.transport.interface import ENGINE_EXIT_MODEL_LOOP_DIED, JobResult

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    reader: ipc.MessageReader = field(default_factory=ipc.MessageReader)
    jobs: dict[int, Future[JobResult]] = field(default_factory=dict)
    closed: bool = False


class EngineServer:
    """Serves one ``Runtime`` to the HTTP workers over a Unix socket."""

    def __init__(self, runtime: Runtime, path: str) -> None:
        self.runtime = runtime
        self.path = path
        self._selector = selectors.DefaultSelector()
        self._outbox: queue.SimpleQueue[tuple[_Connection, Any]] = queue.SimpleQueue()
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if os.path.exists(path):
            os.unlink(path)  # left by a crashed predecessor
        # Before the socket listens: a worker that connects finds a fresh beat.
        self._heartbeat = Heartbeat(heartbeat_path(path), create=True)
        self._beaten_at = time.monotonic()
        self.answered = 0  # jobs answered (results or errors), for the heartbeat
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._sender = threading.Thread(
            target=self._send_loop, name="gradcam-send-loop", daemon=True
        )
        self._sender.start()

    # --- receive loop ----------------------------------------------------------

    def serve(self, shutdown_timeout_s: float) -> None:
        """Run the receive loop until ``stop()``; then drain and return."""
        drained = threading.Event()
        drainer: threading.Thread | None = None
        while not (self._stopping and drained.is_set()):
            now = time.monotonic()
            if now - self._beaten_at >= BEAT_EVERY_S and self.runtime.healthy:
                self._heartbeat.beat(self.answered)
                self._beaten_at = now
            for key, _ in self._selector.select(timeout=BEAT_EVERY_S):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._clear_wake()
                else:
                    self._receive(key.data)
            if self._stopping and drainer is None:
                drainer = threading.Thread(
                    target=self._drain,
                    args=(shutdown_timeout_s, drained),
                    name="gradcam-drain",
                    daemon=True,
                )
                drainer.start()
        self._outbox.put((None, None))  # type: ignore[arg-type]
        self._sender.join(shutdown_timeout_s)
        self._listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._heartbeat.close()

    def stop(self) -> None:
        """Async-signal-safe enough: a flag and one byte on a socket."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _clear_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _drain(self, timeout_s: float, done: threading.Event) -> None:
        logger.info("stopping: finishing %d queued request(s)", self.runtime.queue_depth)
        self.runtime.close(drain=True, timeout_s=timeout_s)
        done.set()
        self.stop()  # wake the receive loop so it sees `done`

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ipc.SOCKET_BUFFER_BYTES)
        connection = _Connection(sock)
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def _receive(self, connection: _Connection) -> None:
        try:
            messages = connection.reader.read(connection.sock)
        except ipc.ProtocolError as error:
            logger.error("dropping a connection that broke the protocol: %s", error)
            messages = []
            connection.reader.eof = True
        for header, frames in messages:
            self._handle(connection, header, frames)
        if connection.reader.eof:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        """The worker went away: forget its jobs; the send loop closes the socket."""
        self._selector.unregister(connection.sock)
        connection.closed = True
        for future in list(connection.jobs.values()):
            future.cancel()
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)
        self._outbox.put((connection, "close"))

    def _handle(
        self, connection: _Connection, header: dict[str, Any], frames: list[np.ndarray]
    ) -> None:
        op, request_id = header.get("op"), int(header.get("id", 0))
        if op == "explain":
            self._submit(connection, request_id, header, frames)
        elif op == "cancel":
            future = connection.jobs.get(request_id)
            if future is not None:
                future.cancel()
        elif op == "ping":
            self._reply(
                connection,
                ipc.encode(
                    {
                        "id": request_id,
                        "healthy": self.runtime.healthy,
                        "queue": self.runtime.queue_depth,
                    }
                ),
            )
        elif op == "hello":
            self._reply(
                connection,
                ipc.encode(
                    {
                        "id": request_id,
                        "catalog": self.runtime.catalog().to_dict(),
                        "pid": os.getpid(),
                        "device": str(self.runtime.device),
                    }
                ),
            )
        else:
            self._reply(connection, ipc.encode_error(request_id, ValueError(f"unknown op {op!r}")))

    def _submit(
        self,
        connection: _Connection,
        request_id: int,
        header: dict[str, Any],
        frames: list[np.ndarray],
    ) -> None:
        if self._stopping:
            self._reply(
                connection,
                ipc.encode_error(
                    request_id, Overloaded("The server is shutting down; retry on another replica.")
                ),
            )
            return
        try:
            job = ipc.decode_job(header, frames)
            future = self.runtime.submit(job, float(header["deadline"]))
        except (ServiceError, KeyError, TypeError, ValueError) as error:
            self._reply(connection, ipc.encode_error(request_id, error))
            return
        connection.jobs[request_id] = future
        # Runs on the model loop (or here, if already done): only a queue put.
        future.add_done_callback(lambda f: self._outbox.put((connection, (request_id, f))))

    def _reply(self, connection: _Connection, buffers: list[memoryview]) -> None:
        self._outbox.put((connection, buffers))

    # --- send loop -------------------------------------------------------------

    def _send_loop(self) -> None:
        try:
            while True:
                connection, what = self._outbox.get()
                if connection is None:
                    return
                try:
                    self._send(connection, what)
                except Exception as error:  # one bad reply must not silence the engine
                    log_failure(logger, "could not send a reply; dropping that connection", error)
                    self._abandon(connection)
        except BaseException as error:
            # Without its send loop the engine would take work and answer nothing.
            log_failure(
                logger,
                "the send loop died; exiting so the supervisor restarts the engine",
                error,
                logging.CRITICAL,
            )
            logging.shutdown()
            os._exit(ENGINE_EXIT_MODEL_LOOP_DIED)

    def _send(self, connection: _Connection, what: Any) -> None:
        if what == "close":
            connection.sock.close()
            return
        if isinstance(what, tuple):
            request_id, future = what
            connection.jobs.pop(request_id, None)
            self.answered += 1  # only this thread writes it
            if future.cancelled() or connection.closed:
                return  # nobody waits for it any more
            error = future.exception()
            if error is not None:
                if not isinstance(error, ServiceError):
                    log_failure(logger, f"request {request_id} failed in the model", error)
                buffers = ipc.encode_error(request_id, error)
            else:
                buffers = ipc.encode_result(request_id, future.result())
        else:
            buffers = what
        if connection.closed:
            return
        try:
            ipc.send_message(connection.sock, buffers, ipc.SEND_TIMEOUT_S)
        except ipc.PeerGone as gone:
            logger.warning("a worker stopped reading its replies (%s); dropping it", gone)
            self._abandon(connection)

    def _abandon(self, connection: _Connection) -> None:
        """Shut a connection down: the worker sees EOF (and fails and reconnects), the
        receive loop sees it too and closes it through the outbox."""
        connection.closed = True
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)
