"""Whether an engine process runs, as one HTTP worker's connection to it sees it.

An engine that is alive but does not run (stopped, wedged) keeps its socket open,
so the connection alone cannot tell: its heartbeat (``service.transport.heartbeat``)
goes stale instead. A reply counts as a beat (an engine that answers is alive,
whatever delayed its beat). While neither is recent enough new requests get 503
at once; each change is logged once, not per request.
"""

from __future__ import annotations

import logging
import time

from service.contract.errors import EngineUnavailable
from service.transport.heartbeat import Heartbeat

logger = logging.getLogger(__name__)


class EngineLiveness:
    """One connection's view of its engine's heartbeat and last reply."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path  # the engine's socket: names the engine in log lines
        self.timeout_s = timeout_s
        self.heartbeat: Heartbeat | None = None  # set when the engine greets
        self.replied_at = 0.0  # time.monotonic() of the engine's last reply
        self._was_fresh = True

    def fresh(self) -> bool:
        """Its heartbeat is fresh (or a reply came as recently: an engine that answers
        is alive, whatever delayed its beat); False before its first greeting."""
        heartbeat = self.heartbeat
        if heartbeat is None:
            return False
        age = min(heartbeat.age_s(), time.monotonic() - self.replied_at)
        fresh = age <= self.timeout_s
        if fresh != self._was_fresh:  # said once per change, not per request
            self._was_fresh = fresh
            if fresh:
                logger.warning("engine %s: its heartbeat is back", self.path)
            else:
                logger.warning(
                    "engine %s: no heartbeat for %.1f s (limit %.1f s): new "
                    "requests get 503 until it is back",
                    self.path,
                    age,
                    self.timeout_s,
                )
        return fresh

    def hung_error(self) -> EngineUnavailable:
        """The 503 for a request to an engine that has stopped running."""
        age = self.heartbeat.age_s() if self.heartbeat is not None else float("inf")
        return EngineUnavailable(
            f"The engine has not run for {age:.1f} s (hung or stopped; it "
            "is restarted if it does not recover); retry shortly."
        )
