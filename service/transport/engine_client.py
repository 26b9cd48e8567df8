"""An HTTP worker's side of the engine processes: the pool, and failover between them.

``EnginePool`` is the ``interface.Engine`` of the HTTP side: it sends each job to the
responsive engine with the fewest requests outstanding. It holds one
``EngineConnection`` per engine process (``engine_connection``: the socket, the
reader thread, replies matched to requests, the engine's heartbeat).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from service import metrics
from service.contract.errors import EngineUnavailable, ServiceError
from service.transport.engine_connection import EngineConnection
from service.transport.interface import ENGINE_SOCKETS_ENV, Catalog, Job, JobResult, wait_for


class EnginePool:
    """The engines of this machine as one ``interface.Engine`` for the explain path."""

    def __init__(self, paths: Sequence[str], heartbeat_timeout_s: float = 1.5) -> None:
        if not paths:
            raise ValueError("no engine sockets given")
        self.connections = [EngineConnection(path, heartbeat_timeout_s) for path in paths]
        self._catalog: Catalog | None = None

    @classmethod
    def from_env(cls, heartbeat_timeout_s: float = 1.5) -> EnginePool:
        value = os.environ.get(ENGINE_SOCKETS_ENV, "")
        paths = [p for p in value.split(os.pathsep) if p]
        if not paths:
            raise RuntimeError(
                f"{ENGINE_SOCKETS_ENV} is not set: start the server with "
                "`gradcam-service serve`, which starts the engines"
            )
        return cls(paths, heartbeat_timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until some engine has greeted this worker (its hello carries the catalog)."""
        deadline = time.monotonic() + timeout_s
        while not any(c.connected for c in self.connections):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.connections[0].wait_connected(min(left, 0.05))
        return True

    def catalog(self) -> Catalog:
        for connection in self.connections:
            if connection.catalog is not None:
                # Every engine serves the same models file; keep the last one seen
                # so model listings still answer while an engine restarts.
                self._catalog = connection.catalog
                break
        if self._catalog is None:
            raise EngineUnavailable(
                "No engine is ready yet (the models are loading); retry shortly."
            )
        return self._catalog

    def run(
        self, job: Job, deadline: float, disconnected: Callable[[], bool] | None = None
    ) -> JobResult:
        sent = time.monotonic()
        result = wait_for(self._submit(job, deadline), deadline, disconnected)
        in_engine = result.timings.queue_wait_s + result.timings.compute_s
        metrics.STAGE_DURATION.labels("transport").observe(
            max(0.0, time.monotonic() - sent - in_engine)
        )
        return result

    def _submit(self, job: Job, deadline: float) -> Future[JobResult]:
        """To the connected engine with the fewest requests outstanding; the next one if
        that connection breaks while sending."""
        live = sorted((c for c in self.connections if c.responsive), key=lambda c: c.outstanding)
        if not live:  # connected but hung: say so
            live = [c for c in self.connections if c.connected][:1]
        failure = EngineUnavailable(
            "No engine is running (starting, or restarting after a failure); retry shortly."
        )
        for connection in live:
            try:
                return connection.submit(job, deadline)
            except EngineUnavailable as error:
                failure = error
        raise failure

    def ready(self, timeout_s: float = 1.0) -> bool:
        """True if some engine answers a ping and says its model loop is alive."""
        for connection in self.connections:
            if not connection.responsive:
                continue
            try:
                if connection.request("ping", timeout_s).get("healthy"):
                    return True
            except ServiceError:
                continue
        return False

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
