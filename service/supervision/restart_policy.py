"""When a dead engine process is started again, and when the supervisor gives up.

Pure decisions, no processes and no clock of their own: the supervisor passes the
time (``now``, ``time.monotonic()``) and what it knows of the dead process, and
gets back when to start it again, or ``None`` (give up: serve exits so that an
orchestrator replaces the pod). The rules (docs/architecture.md, "Supervision"):

- a crash is restarted after 0, 1, 1, 2, 3, 5 … s for the 1st, 2nd … in a row;
  more than ``max_restarts`` in a row and the supervisor gives up;
- an engine that has answered a request, or stayed up ``STABLE_S``, starts a new
  count: its next crash is a new incident, not the same one;
- an engine killed by a signal while still loading (before it said ready) never
  ran: it is restarted at once and not counted as a crash, up to
  ``LOADING_KILLS_FACTOR`` × ``max_restarts`` times in a row (then it counts);
  one the supervisor itself killed as hung is a crash like any other;
- an engine that exits with ``ENGINE_EXIT_CONFIG`` cannot load its models: give up.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.transport.interface import ENGINE_EXIT_CONFIG

# An engine that stays up this long has recovered: its crash count starts again.
STABLE_S = 60.0
# Kills of a still-loading engine allowed in a row, per allowed crash.
LOADING_KILLS_FACTOR = 3


def backoff_s(crashes: int) -> float:
    """0, 1, 1, 2, 3, 5 … seconds for the 1st, 2nd … crash in a row."""
    a, b = 0, 1
    for _ in range(max(0, crashes - 1)):
        a, b = b, a + b
    return float(a)


@dataclass(frozen=True)
class Exit:
    """What the supervisor knows of an engine that has exited."""

    code: int  # its exit status; negative: killed by that signal
    ready_at: float | None  # when it said ready (None: it was still loading)
    served: bool  # it answered at least one request
    hang_killed: bool = False  # the supervisor killed it for a stale heartbeat


@dataclass(frozen=True)
class Restart:
    """The decision: start again at ``at`` (``time.monotonic()``), or give up (None)."""

    at: float | None
    counted: bool  # a crash in the row (else a kill while loading, or a config failure)
    crashes: int  # crashes in a row, this one included


@dataclass
class RestartPolicy:
    """One engine slot's crash history."""

    max_restarts: int
    crashes: int = 0
    loading_kills: int = 0

    def after(self, exit: Exit, now: float) -> Restart:
        if exit.code == ENGINE_EXIT_CONFIG:
            return Restart(None, False, self.crashes)
        if exit.ready_at is None and exit.code < 0 and not exit.hang_killed:
            self.loading_kills += 1
            if self.loading_kills <= LOADING_KILLS_FACTOR * max(1, self.max_restarts):
                return Restart(now, False, self.crashes)
        if exit.served or (exit.ready_at is not None and now - exit.ready_at >= STABLE_S):
            self.crashes = 0  # it served: a new incident, not the same one
        if exit.ready_at is not None:
            self.loading_kills = 0
        self.crashes += 1
        if self.crashes > self.max_restarts:
            return Restart(None, True, self.crashes)
        return Restart(now + backoff_s(self.crashes), True, self.crashes)
