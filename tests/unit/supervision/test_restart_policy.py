"""The supervisor's restart policy (``service/supervision/restart_policy.py``), with the clock in
the test's hands: no processes, no sleeps."""

from __future__ import annotations

import signal

from service.supervision.restart_policy import (
    LOADING_KILLS_FACTOR,
    STABLE_S,
    Exit,
    RestartPolicy,
    backoff_s,
)
from service.transport.interface import ENGINE_EXIT_CONFIG

CRASH = 1  # a non-zero exit status
KILLED = -signal.SIGKILL


def _crash(ready_at: float | None = 0.0, served: bool = False, code: int = CRASH) -> Exit:
    return Exit(code=code, ready_at=ready_at, served=served)


def test_backoff_is_fibonacci_from_zero() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [0, 1, 1, 2, 3, 5, 8, 13]


def test_crashes_in_a_row_back_off_then_give_up() -> None:
    policy, now = RestartPolicy(max_restarts=5), 100.0
    delays = []
    for _ in range(5):
        decision = policy.after(_crash(ready_at=now - 1), now)
        assert decision.at is not None and decision.counted
        delays.append(decision.at - now)
        now = decision.at + 1  # it starts, says ready, and crashes again a second later
    assert delays == [0, 1, 1, 2, 3]
    final = policy.after(_crash(ready_at=now - 1), now)
    assert final.at is None and final.crashes == 6


def test_an_engine_that_served_or_stayed_up_starts_a_new_count() -> None:
    policy = RestartPolicy(max_restarts=2)
    policy.after(_crash(), 10.0)
    policy.after(_crash(), 11.0)
    assert policy.crashes == 2
    decision = policy.after(_crash(ready_at=12.0, served=True), 13.0)
    assert decision.at == 13.0 and decision.crashes == 1  # a new incident: no back-off
    policy.after(_crash(ready_at=13.0), 14.0)
    up_long = policy.after(_crash(ready_at=20.0), 20.0 + STABLE_S)
    assert up_long.crashes == 1
    almost = policy.after(_crash(ready_at=100.0), 100.0 + STABLE_S - 0.1)
    assert almost.crashes == 2


def test_kills_while_loading_restart_at_once_and_do_not_count_up_to_a_bound() -> None:
    policy = RestartPolicy(max_restarts=2)
    allowed = LOADING_KILLS_FACTOR * 2
    for i in range(allowed):
        decision = policy.after(_crash(ready_at=None, code=KILLED), float(i))
        assert decision.at == float(i) and not decision.counted and decision.crashes == 0
    # Killed once too often while loading: now it counts as a crash.
    decision = policy.after(_crash(ready_at=None, code=KILLED), 50.0)
    assert decision.counted and decision.crashes == 1
    # Once it has said ready, the loading kills start again from zero.
    policy.after(_crash(ready_at=51.0, served=True), 52.0)
    assert policy.loading_kills == 0


def test_a_crash_while_loading_that_is_no_kill_counts() -> None:
    policy = RestartPolicy(max_restarts=3)
    decision = policy.after(_crash(ready_at=None, code=CRASH), 5.0)
    assert decision.counted and decision.crashes == 1


def test_an_engine_killed_as_hung_counts_even_while_loading() -> None:
    policy = RestartPolicy(max_restarts=3)
    exit = Exit(code=KILLED, ready_at=None, served=False, hang_killed=True)
    decision = policy.after(exit, 5.0)
    assert decision.counted and decision.crashes == 1


def test_a_models_file_it_cannot_load_gives_up_at_once() -> None:
    policy = RestartPolicy(max_restarts=10)
    decision = policy.after(_crash(ready_at=None, code=ENGINE_EXIT_CONFIG), 1.0)
    assert decision.at is None and not decision.counted
