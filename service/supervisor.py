"""``gradcam-service serve``: start the engines and gunicorn, watch them, stop them in order.

``serve`` execs ``python -m service.supervisor`` with its flags as ``GRADCAM_*``
variables::

    serve (this process: no torch, no Flask)
     ├─ engine 0 … engine N-1   python -m service.engine.process, one per device
     └─ gunicorn master         HTTP workers, one per core (no torch)

Why a supervisor of our own: gunicorn's master reaps every child it has, so an
engine started from one of its hooks would have its exit status stolen; and the
engine must come from a fresh interpreter, never a fork of a process that
touched CUDA. Here the engines and gunicorn are siblings.

- **Start-up.** Engine 0 starts on the configured device; once it has loaded
  and warmed up its models it writes ``ready <device> <cuda devices>`` on a pipe.
  With ``engines = 0`` (auto) and several GPUs, one more engine starts per GPU.
  A broken models file makes engine 0 exit with ``ENGINE_EXIT_CONFIG``: serve prints
  nothing more and exits 2. Then gunicorn starts, told the engines' sockets.
- **Crashes.** A dead engine is restarted after a back-off of 0, 1, 1, 2, 3,
  5 … s for its 1st, 2nd … crash in a row; meanwhile the workers answer 503
  ``engine_unavailable`` and ``/readyz`` is 503. An engine that has answered a
  request, or stayed up a minute, starts a new count. An engine killed by a signal
  while still loading (before it said ready) is restarted at once and not counted
  as a crash (a fast crash loop it is not: it never ran), up to
  ``_LOADING_KILLS_FACTOR`` × ``engine_max_restarts`` times in a row. After
  ``engine_max_restarts`` crashes in a row serve stops everything and exits 1, so
  an orchestrator restarts the pod. If gunicorn dies, serve stops the engines and
  exits 1.
- **Hangs.** An engine whose heartbeat (``service.transport.heartbeat``) is older than
  ``engine_hang_restart_s`` is killed (SIGKILL also ends a stopped process) and
  restarted like a crashed one; the workers have answered 503 since its beat was
  ``engine_heartbeat_timeout_s`` old.
- **Memory.** ``serve`` makes the memory budget file (``service.memory``) that the
  HTTP workers reserve from, and about once a second records in it what the
  processes hold when idle (engines: their peak).
- **SIGTERM / SIGINT.** gunicorn first (it stops accepting and drains its
  requests, which still have their engines), then the engines (each finishes
  what it holds), each bounded by ``shutdown_timeout_s``, then SIGKILL for what
  is left; the socket folder and a metrics folder of our own are removed.

Children run in sessions of their own (a terminal's Ctrl-C reaches only this
process, which then stops them in order) and get SIGTERM if this process dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from service import logs
from service.allocator import engine_allocator_env
from service.contract.errors import ConfigError
from service.contract.settings import Settings, available_cores
from service.memory import BUDGET_FILE_ENV, MB, MemoryBudget, default_budget_bytes, held_bytes
from service.restart_policy import Exit, RestartPolicy
from service.transport.heartbeat import Heartbeat, heartbeat_path
from service.transport.interface import ENGINE_EXIT_CONFIG, ENGINE_SOCKETS_ENV

logger = logging.getLogger("service.supervisor")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
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


class Supervisor:
    def __init__(self, settings: Settings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.cores = available_cores()
        # Checked before anything is made: "tcmalloc" must be installed.
        self._allocator = engine_allocator_env(settings.engine_allocator, env)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="gradcam-"))
        self.engines: list[EngineSlot] = []
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self._own_metrics_dir: Path | None = None
        self._metrics: ModuleType | None = None
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        budget = (settings.memory_budget_mb * MB) or default_budget_bytes()
        self.memory = MemoryBudget(str(self.runtime_dir / "memory.budget"), budget)
        self.env[BUDGET_FILE_ENV] = self.memory.path
        self._memory_logged = False

    # --- the whole life --------------------------------------------------------

    def run(self) -> int:
        self._prepare_metrics_dir()
        # Imported only now: prometheus_client picks its multiprocess mode at import.
        from service import metrics

        self._metrics = metrics
        if self.settings.metrics_port:
            metrics.serve_on_port(self.settings.metrics_port, self.settings.host)
            logger.info(
                "metrics on http://%s:%d/metrics", self.settings.host, self.settings.metrics_port
            )
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        if _early_stop:
            self._on_stop_signal(_early_stop[0], None)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop through the fd
        try:
            code = self._start()
            if code is None:
                code = self._watch()
        finally:
            self._stop_all()
            self._cleanup()
        return code

    def _prepare_metrics_dir(self) -> None:
        """The multiprocess metrics folder, emptied: stale files would resurrect old counts."""
        given = self.env.get("PROMETHEUS_MULTIPROC_DIR")
        if given:
            path = Path(given)
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = self._own_metrics_dir = Path(tempfile.mkdtemp(prefix="gradcam-metrics-"))
        for stale in path.glob("*.db"):
            stale.unlink()
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # for mark_process_dead here

    def _start(self) -> int | None:
        """Engine 0 (and one per further GPU), then gunicorn; an exit code on failure."""
        first = EngineSlot(
            0,
            self.settings.device,
            str(self.runtime_dir / "engine-0.sock"),
            RestartPolicy(self.settings.engine_max_restarts),
        )
        self.engines.append(first)
        self._launch(first)
        ready = self._wait_ready(first)
        if ready is None:
            return 0 if self._stopping else self._exit_code_of_failed_start(first)
        device, cuda_devices = ready
        first.device = device
        if self.settings.engines == 0 and device.startswith("cuda") and cuda_devices > 1:
            count = cuda_devices
        else:
            count = max(1, self.settings.engines)
        for index in range(1, count):
            gpu = f"cuda:{index % cuda_devices}" if device.startswith("cuda") else device
            slot = EngineSlot(
                index,
                gpu,
                str(self.runtime_dir / f"engine-{index}.sock"),
                RestartPolicy(self.settings.engine_max_restarts),
            )
            self.engines.append(slot)
            self._launch(slot)
        for slot in self.engines[1:]:
            if self._wait_ready(slot) is None:
                return 0 if self._stopping else self._exit_code_of_failed_start(slot)
        self._launch_gunicorn()
        logger.info(
            "serving on http://%s:%d with %d engine(s): %s",
            self.settings.host,
            self.settings.port,
            len(self.engines),
            ", ".join(slot.device for slot in self.engines),
        )
        return None

    def _exit_code_of_failed_start(self, slot: EngineSlot) -> int:
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

    # --- engines ---------------------------------------------------------------

    def _engine_env(self) -> dict[str, str]:
        env = dict(self.env)
        engines = max(1, self.settings.engines)
        threads = self.settings.torch_threads or max(1, self.cores // engines)
        env["GRADCAM_TORCH_THREADS"] = str(threads)
        # OpenMP threads that sleep at their barriers instead of spinning: the HTTP
        # workers share the cores with the model on a CPU machine (README, "Under load").
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.update(self._allocator)
        return env

    def _launch(self, slot: EngineSlot) -> None:
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable,
            "-m",
            "service.engine.process",
            "--socket",
            slot.socket,
            "--device",
            slot.device,
            "--ready-fd",
            str(write_fd),
        ]
        slot.process = subprocess.Popen(
            command,
            env=self._engine_env(),
            pass_fds=(write_fd,),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.ready_pipe, slot.ready_at, slot.started_at = read_fd, None, time.monotonic()
        slot.heartbeat, slot.hang_killed = None, False
        logger.info("engine %d starting on %s (pid %d)", slot.index, slot.device, slot.process.pid)

    def _read_ready(self, slot: EngineSlot) -> tuple[str, int] | None:
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

    def _wait_ready(self, slot: EngineSlot) -> tuple[str, int] | None:
        """Block until ``slot`` is ready (None if it exits first or serve is stopped)."""
        assert slot.process is not None and slot.ready_pipe is not None
        while not self._stopping:
            select.select([slot.ready_pipe, self._wake_r], [], [], 1.0)
            self._drain_wake()
            if slot.process.poll() is not None:
                return None
            ready = self._read_ready(slot)
            if ready is not None:
                return ready
            if slot.ready_pipe is None:
                return None  # closed without a word: it is exiting
        return None

    def _engine_exited(self, slot: EngineSlot, code: int, now: float) -> bool:
        """Plan the restart of a dead engine; False if it has crashed too often."""
        assert slot.process is not None
        assert self._metrics is not None
        self._metrics.mark_process_dead(slot.process.pid)
        self._metrics.ENGINE_RESTARTS.inc()
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
                self.settings.engine_max_restarts,
            )
        slot.process, slot.restart_at = None, decision.at
        return True

    # --- gunicorn --------------------------------------------------------------

    def _launch_gunicorn(self) -> None:
        env = dict(self.env)
        env[ENGINE_SOCKETS_ENV] = os.pathsep.join(slot.socket for slot in self.engines)
        command = [sys.executable, "-m", "gunicorn", "-c", "python:service.server.gunicorn_conf"]
        self.gunicorn = subprocess.Popen(
            command, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )

    # --- the watch loop --------------------------------------------------------

    def _watch(self) -> int:
        assert self.gunicorn is not None
        while not self._stopping:
            timeout = 1.0
            pending = [s.restart_at for s in self.engines if s.restart_at is not None]
            if pending:
                timeout = max(0.0, min(timeout, min(pending) - time.monotonic()))
            pipes = [s.ready_pipe for s in self.engines if s.ready_pipe is not None]
            select.select([self._wake_r, *pipes], [], [], timeout)
            self._drain_wake()
            now = time.monotonic()
            for slot in self.engines:
                if slot.ready_pipe is not None:
                    self._read_ready(slot)
                self._kill_if_hung(slot)
                if slot.process is not None and (code := slot.process.poll()) is not None:
                    if self._stopping:
                        break
                    if not self._engine_exited(slot, code, now):
                        return 1
                if slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
                    slot.restart_at = None
                    self._launch(slot)
            self._measure_memory()
            if (code := self.gunicorn.poll()) is not None and not self._stopping:
                logger.critical("gunicorn exited with code %d; stopping", code)
                return 128 - code if code < 0 else (code or 1)  # killed by a signal: 128 + N
        return 0

    def _measure_memory(self) -> None:
        """Record what the processes hold with no request in flight (engines: their peak,
        since batches come and go) as the budget's fixed part."""
        fixed = held_bytes(
            os.getpid(),
            self.gunicorn.pid if self.gunicorn else None,
            [s.process.pid for s in self.engines if s.process is not None],
        )
        if not self.memory.set_fixed(fixed, only_when_idle=True) or self._memory_logged:
            return
        self._memory_logged = True
        budget = self.memory.budget_bytes
        if fixed >= budget:
            logger.error(
                "memory budget %d MB: the idle service already holds %d MB; every "
                "request will be refused (raise GRADCAM_MEMORY_BUDGET_MB)",
                budget // MB,
                fixed // MB,
            )
        else:
            logger.info(
                "memory budget %d MB: %d MB held idle, %d MB for requests",
                budget // MB,
                fixed // MB,
                (budget - fixed) // MB,
            )

    def _kill_if_hung(self, slot: EngineSlot) -> None:
        """SIGKILL an engine whose heartbeat is older than ``engine_hang_restart_s``; the
        watch loop then sees it exit and restarts it."""
        if slot.process is None or slot.heartbeat is None or slot.hang_killed:
            return
        age = slot.heartbeat.age_s()
        if age > self.settings.engine_hang_restart_s and slot.process.poll() is None:
            logger.error(
                "engine %d (pid %d) has not run for %.1f s (limit %.0f s): killing it",
                slot.index,
                slot.process.pid,
                age,
                self.settings.engine_hang_restart_s,
            )
            slot.hang_killed = True
            slot.process.kill()

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            logger.info("%s: stopping (HTTP first, then the engines)", signal.Signals(signum).name)
        self._stopping = True

    def _on_hup(self, _signum: int, _frame: object) -> None:
        if self.gunicorn is not None and self.gunicorn.poll() is None:
            self.gunicorn.send_signal(signal.SIGHUP)  # gunicorn reloads its workers

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # --- stopping --------------------------------------------------------------

    def _stop_all(self) -> None:
        """gunicorn drains first (its requests still have engines), then the engines."""
        timeout = self.settings.shutdown_timeout_s + 5
        if self.gunicorn is not None:
            _terminate([self.gunicorn], timeout, "gunicorn")
        engines = [s.process for s in self.engines if s.process is not None]
        # An engine may take the timeout to finish its queue, then as long to send.
        _terminate(engines, 2 * timeout, "engine")
        for slot in self.engines:
            if slot.process is not None and self._metrics is not None:
                self._metrics.mark_process_dead(slot.process.pid)

    def _cleanup(self) -> None:
        for slot in self.engines:
            if slot.ready_pipe is not None:
                os.close(slot.ready_pipe)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._own_metrics_dir is not None:
            shutil.rmtree(self._own_metrics_dir, ignore_errors=True)


def _terminate(processes: list[subprocess.Popen[bytes]], timeout_s: float, what: str) -> None:
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


# A SIGTERM or SIGINT that came before the supervisor took over its signals.
_early_stop: list[int] = []


def main() -> int:
    """Run the service until a signal stops it; the exit code for the shell."""
    # First: a stop asked for while settings are read still stops cleanly (exit 0).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: _early_stop.append(number))
    logs.configure("INFO")
    try:
        settings = Settings.from_env()
        supervisor = Supervisor(settings, dict(os.environ))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
