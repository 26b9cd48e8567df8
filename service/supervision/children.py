"""The supervisor's children, one at a time: an engine process, and what every child gets.

An engine's ``EngineSlot`` is started (``launch_engine``: ``python -m
service.engine``, a fresh interpreter, with a pipe on which it says
``ready <device> <cuda devices>``), read (``read_ready``), and when it exits its
restart is planned (``engine_exited``, by ``restart_policy``); one whose heartbeat
is too old is killed (``kill_if_hung``). Every child, gunicorn too, runs in a
session of its own, gets SIGTERM if the supervisor dies (``die_with_parent``) and
is stopped by SIGTERM, then SIGKILL after a timeout (``terminate``). The order
of it all, and the watch loop, are the supervisor's (``supervisor.py``).

- **Crashes.** A dead engine is restarted after a back-off of 0, 1, 1, 2, 3,
  5 … s for its 1st, 2nd … crash in a row; meanwhile the workers answer 503
  ``engine_unavailable`` and ``/readyz`` is 503. An engine that has answered a
  request, or stayed up a minute, starts a new count. An engine killed by a signal
  while still loading (before it said ready) is restarted at once and not counted
  as a crash (a fast crash loop it is not: it never ran), up to
  ``LOADING_KILLS_FACTOR`` × ``engine_max_restarts`` times in a row. After
  ``engine_max_restarts`` crashes in a row serve stops everything and exits 1, so
  an orchestrator restarts the pod.
- **Hangs.** An engine whose heartbeat (``service.transport.heartbeat``) is older than
  ``engine_hang_restart_s`` is killed (SIGKILL also ends a stopped process) and
  restarted like a crashed one; the workers have answered 503 since its beat was
  ``engine_heartbeat_timeout_s`` old.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from types import ModuleType

from service.contract.settings import Settings
from service.supervision.restart_policy import Exit, RestartPolicy
from service.transport.heartbeat import Heartbeat, heartbeat_path
from service.transport.interface import ENGINE_EXIT_CONFIG, engine_command

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class EngineSlot:
    """One engine process: its device, socket, the process and its restart state."""

    index: int
    device: str
    socket: str
    policy: RestartPolicy  # its crash history: when to restart it (restart_policy.py)
    process: subprocess.Popen[bytes] | None = None
    ready_pipe: int | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    restart_at: float | None = None
    heartbeat: Heartbeat | None = None
    hang_killed: bool = False


def engine_env(
    base: dict[str, str], settings: Settings, cores: int, allocator: dict[str, str]
) -> dict[str, str]:
    """The environment of an engine process: the supervisor's, with its torch threads
    (the cores shared between the engines), passive OpenMP waits and the allocator."""
    engines = max(1, settings.engines)
    threads = settings.torch_threads or max(1, cores // engines)
    env = {
        **base,
        **settings.model_copy(update={"torch_threads": threads}).to_env(["torch_threads"]),
    }
    # OpenMP threads that sleep at their barriers instead of spinning: the HTTP
    # workers share the cores with the model on a CPU machine (docs/performance.md, "Under load").
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(allocator)
    return env


def launch_engine(slot: EngineSlot, env: dict[str, str]) -> None:
    """Start ``slot``'s engine process, with a pipe for its ready word."""
    read_fd, write_fd = os.pipe()
    slot.process = subprocess.Popen(
        engine_command(slot.socket, slot.device, write_fd),
        env=env,
        pass_fds=(write_fd,),
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    slot.ready_pipe, slot.ready_at, slot.started_at = read_fd, None, time.monotonic()
    slot.heartbeat, slot.hang_killed = None, False
    logger.info("engine %d starting on %s (pid %d)", slot.index, slot.device, slot.process.pid)


def read_ready(slot: EngineSlot) -> tuple[str, int] | None:
    """``(device, cuda devices)`` once the engine has said ready; None until then."""
    if slot.ready_pipe is None:
        return None
    try:
        data = os.read(slot.ready_pipe, 256)
    except BlockingIOError:
        return None
    os.close(slot.ready_pipe)
    slot.ready_pipe = None
    words = data.decode(errors="replace").split()
    if len(words) != 3 or words[0] != "ready":
        return None
    slot.ready_at = time.monotonic()
    slot.heartbeat = Heartbeat.open(heartbeat_path(slot.socket))
    logger.info(
        "engine %d ready on %s (pid %d) after %.1f s",
        slot.index,
        words[1],
        slot.process.pid if slot.process else -1,
        time.monotonic() - slot.started_at,
    )
    return words[1], int(words[2])


def exit_code_of_failed_start(slot: EngineSlot) -> int:
    """serve's exit code when ``slot``'s engine did not start: 2 for a configuration
    error (the engine printed it), else 1."""
    code: int | None = 1
    if slot.process is not None:
        # Its ready pipe closes as it exits, a moment before the exit can be reaped:
        # wait that moment, or a configuration error would read as "not ready".
        try:
            code = slot.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
    if code is None:  # alive but said something other than ready: stop it (finally)
        logger.error("engine %d did not report ready", slot.index)
        return 1
    if code == ENGINE_EXIT_CONFIG:
        return 2  # the engine printed the configuration error
    logger.error("engine %d exited with code %s before it was ready", slot.index, code)
    return 1


def engine_exited(
    slot: EngineSlot, code: int, now: float, metrics: ModuleType, max_restarts: int
) -> bool:
    """Plan the restart of a dead engine; False if it has crashed too often."""
    assert slot.process is not None
    metrics.mark_process_dead(slot.process.pid)
    metrics.ENGINE_RESTARTS.inc()
    if slot.ready_pipe is not None:
        os.close(slot.ready_pipe)
        slot.ready_pipe = None
    pid = slot.process.pid
    served = slot.heartbeat is not None and slot.heartbeat.answered() > 0
    decision = slot.policy.after(Exit(code, slot.ready_at, served, slot.hang_killed), now)
    if decision.at is None:
        if code == ENGINE_EXIT_CONFIG:
            logger.critical(
                "engine %d cannot load its models any more (see above): giving up",
                slot.index,
            )
        else:
            logger.critical(
                "engine %d exited with code %d, its %d crash in a row: giving up",
                slot.index,
                code,
                decision.crashes,
            )
        return False
    if not decision.counted:
        logger.error(
            "engine %d (pid %d) was killed by signal %d while loading; restarting it now",
            slot.index,
            pid,
            -code,
        )
    else:
        logger.error(
            "engine %d (pid %d) exited with code %d; restarting it in %.0f s "
            "(crash %d of %d allowed in a row)",
            slot.index,
            pid,
            code,
            decision.at - now,
            decision.crashes,
            max_restarts,
        )
    slot.process, slot.restart_at = None, decision.at
    return True


def kill_if_hung(slot: EngineSlot, limit_s: float) -> None:
    """SIGKILL an engine whose heartbeat is older than ``limit_s`` (the setting
    ``engine_hang_restart_s``); the watch loop then sees it exit and restarts it."""
    if slot.process is None or slot.heartbeat is None or slot.hang_killed:
        return
    age = slot.heartbeat.age_s()
    if age > limit_s and slot.process.poll() is None:
        logger.error(
            "engine %d (pid %d) has not run for %.1f s (limit %.0f s): killing it",
            slot.index,
            slot.process.pid,
            age,
            limit_s,
        )
        slot.hang_killed = True
        slot.process.kill()


def terminate(processes: list[subprocess.Popen[bytes]], timeout_s: float, what: str) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL whatever is still there."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in alive:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error(
                "%s (pid %d) did not stop in %.0f s: killing it", what, process.pid, timeout_s
            )
            process.kill()
            process.wait()
