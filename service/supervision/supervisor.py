"""``gradcam-service serve``: start the engines and gunicorn, watch them, stop them in order.

``serve`` execs ``python -m service.supervision`` with its flags as ``GRADCAM_*``
variables::

    serve (this process: no torch, no Flask)
     ├─ engine 0 … engine N-1   python -m service.engine, one per device
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
- **Crashes and hangs.** A dead engine is restarted after a back-off, a hung one
  killed and restarted (``children``, by ``restart_policy``); too many
  crashes in a row and serve stops everything and exits 1. If gunicorn dies, serve
  stops the engines and exits 1.
- **Memory.** ``serve`` makes the memory budget file (``service.memory``) that the
  HTTP workers reserve from, and about once a second records in it what the
  processes hold when idle (``idle_memory``).
- **SIGTERM / SIGINT.** gunicorn first (it stops accepting and drains its
  requests, which still have their engines), then the engines (each finishes
  what it holds), each bounded by ``shutdown_timeout_s``, then SIGKILL for what
  is left; the socket folder and a metrics folder of our own are removed.

Children run in sessions of their own (a terminal's Ctrl-C reaches only this
process, which then stops them in order) and get SIGTERM if this process dies.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from service import logs
from service.contract.errors import ConfigError
from service.contract.settings import Settings, available_cores
from service.memory import BUDGET_FILE_ENV, MB, MemoryBudget, children, default_budget_bytes
from service.supervision.allocator import engine_allocator_env
from service.supervision.children import (
    EngineSlot,
    die_with_parent,
    engine_env,
    engine_exited,
    exit_code_of_failed_start,
    kill_if_hung,
    launch_engine,
    read_ready,
    terminate,
)
from service.supervision.idle_memory import IdleMemoryRecorder
from service.supervision.restart_policy import RestartPolicy
from service.transport.interface import ENGINE_SOCKETS_ENV

logger = logging.getLogger(__name__)


class Supervisor:
    """serve's children from start to stop: their order, the watch loop, the signals."""

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
        self._idle_memory = IdleMemoryRecorder(self.memory)

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
            return 0 if self._stopping else exit_code_of_failed_start(first)
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
                return 0 if self._stopping else exit_code_of_failed_start(slot)
        self._launch_gunicorn()
        logger.info(
            "serving on http://%s:%d with %d engine(s): %s",
            self.settings.host,
            self.settings.port,
            len(self.engines),
            ", ".join(slot.device for slot in self.engines),
        )
        return None

    # --- engines (each one's parts: children.py) --------------------------------

    def _launch(self, slot: EngineSlot) -> None:
        launch_engine(slot, engine_env(self.env, self.settings, self.cores, self._allocator))

    def _wait_ready(self, slot: EngineSlot) -> tuple[str, int] | None:
        """Block until ``slot`` is ready (None if it exits first or serve is stopped)."""
        assert slot.process is not None and slot.ready_pipe is not None
        while not self._stopping:
            select.select([slot.ready_pipe, self._wake_r], [], [], 1.0)
            self._drain_wake()
            if slot.process.poll() is not None:
                return None
            ready = read_ready(slot)
            if ready is not None:
                return ready
            if slot.ready_pipe is None:
                return None  # closed without a word: it is exiting
        return None

    # --- gunicorn --------------------------------------------------------------

    def _launch_gunicorn(self) -> None:
        env = dict(self.env)
        env[ENGINE_SOCKETS_ENV] = os.pathsep.join(slot.socket for slot in self.engines)
        command = [sys.executable, "-m", "gunicorn", "-c", "python:service.server.gunicorn_conf"]
        self.gunicorn = subprocess.Popen(
            command, env=env, start_new_session=True, preexec_fn=die_with_parent
        )

    # --- the watch loop --------------------------------------------------------

    def _watch(self) -> int:
        assert self.gunicorn is not None
        while not self._stopping:
            # Until the budget's fixed part is first measured no worker answers /readyz:
            # look for the first worker often.
            timeout = 1.0 if self.memory.measured else 0.1
            pending = [s.restart_at for s in self.engines if s.restart_at is not None]
            if pending:
                timeout = max(0.0, min(timeout, min(pending) - time.monotonic()))
            pipes = [s.ready_pipe for s in self.engines if s.ready_pipe is not None]
            select.select([self._wake_r, *pipes], [], [], timeout)
            self._drain_wake()
            now = time.monotonic()
            for slot in self.engines:
                if slot.ready_pipe is not None:
                    read_ready(slot)
                kill_if_hung(slot, self.settings.engine_hang_restart_s)
                if slot.process is not None and (code := slot.process.poll()) is not None:
                    if self._stopping:
                        break
                    assert self._metrics is not None
                    max_restarts = self.settings.engine_max_restarts
                    if not engine_exited(slot, code, now, self._metrics, max_restarts):
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
        """The idle processes' memory, as the budget's fixed part (idle_memory.py); the
        first time only once gunicorn has a worker (workers answer ``/readyz`` only after
        it: a measure without them would leave a worker's size unaccounted)."""
        if self.gunicorn is None or (not self.memory.measured and not children(self.gunicorn.pid)):
            return
        self._idle_memory.record(
            self.gunicorn.pid,
            [s.process.pid for s in self.engines if s.process is not None],
        )

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
            terminate([self.gunicorn], timeout, "gunicorn")
        engines = [s.process for s in self.engines if s.process is not None]
        # An engine may take the timeout to finish its queue, then as long to send.
        terminate(engines, 2 * timeout, "engine")
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
