"""Processes dying or stopping under load: only what was in flight on them may fail."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.helpers import ServerFactory, encode, phantom_png, wait_until

BODY: dict[str, Any] = {
    "images": [encode(phantom_png(2, 96, 96))],
    "heatmap": {"format": "array", "size": "layer"},
}


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    status: int  # 0: no HTTP answer (refused, reset)
    error: str = ""


class Load:
    """``clients`` threads posting ``BODY`` back to back, from a second after start-up
    (warmed up) until ``finish()``."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self._threads:
            thread.start()
        # Flowing: an answer to a request that started over half a second ago.
        self.wait_for(
            lambda o: o.status == 200 and o.started < time.monotonic() - 0.5, "the load to flow"
        )

    def wait_for(self, done: Callable[[Outcome], bool], what: str, timeout_s: float = 30) -> None:
        """Until an outcome for which ``done`` holds (a gate on what the test needs)."""
        wait_until(lambda: any(done(o) for o in list(self.outcomes)), timeout_s, what)

    def _client(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = requests.post(f"{self.url}/v1/explain", json=BODY, timeout=30)
                outcome = Outcome(
                    started,
                    time.monotonic(),
                    response.status_code,
                    response.json().get("error", {}).get("code", ""),
                )
            except requests.RequestException as error:
                outcome = Outcome(started, time.monotonic(), 0, type(error).__name__)
                time.sleep(0.05)  # a client's pause before it tries again: time, not a wait
            self.outcomes.append(outcome)

    def finish(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.outcomes


@pytest.mark.slow
def test_a_worker_killed_under_load_loses_only_its_requests_in_flight(
    live_server: ServerFactory,
) -> None:
    live = live_server(workers=2)
    load = Load(live.url, 6)
    victim = live.worker_pids()[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(live.worker_pids()) == 2 and victim not in live.worker_pids(),
        10,
        "gunicorn to replace the killed worker",
    )
    load.wait_for(
        lambda o: o.status == 200 and o.started > killed_at + 0.5 and o.ended > killed_at + 2,
        "answers after the kill",
    )
    outcomes = load.finish()
    failed = [o for o in outcomes if o.status != 200]
    # Only requests already running when the worker died, at most one per client.
    assert all(o.started < killed_at + 0.05 for o in failed), failed
    assert len(failed) <= 6, failed
    after = [o for o in outcomes if o.started > killed_at + 0.5]
    assert after and all(o.status == 200 for o in after)
    assert len(live.worker_pids()) == 2 and victim not in live.worker_pids()
    # Served again within 10 s: the other worker never stopped.
    assert max(o.ended for o in outcomes if o.status == 200) > killed_at + 2


@pytest.mark.slow
def test_sigterm_under_load_finishes_what_was_accepted(live_server: ServerFactory) -> None:
    live = live_server(workers=2)
    load = Load(live.url, 8)
    sent_at = time.monotonic()
    live.process.send_signal(signal.SIGTERM)
    assert live.process.wait(60) == 0
    stopped_at = time.monotonic()
    outcomes = load.finish()
    # Everything that started well before the signal was answered, and answered 200.
    earlier = [o for o in outcomes if o.started < sent_at - 0.5]
    assert earlier and all(o.status == 200 for o in earlier), [
        o for o in earlier if o.status != 200
    ]
    # Nothing hung: what was not served was refused at once (never a 500).
    assert all(o.status in (0, 200, 503) for o in outcomes)
    assert all(o.ended - o.started < 5 for o in outcomes if o.status != 200)
    assert stopped_at - sent_at < 30
    assert "Traceback" not in live.read_log()
