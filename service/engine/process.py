"""The engine process: one per device, the only process that runs torch.

    python -m service.engine --socket PATH [--device cuda:0] [--ready-fd FD]

``gradcam-service serve`` starts it from a fresh interpreter (never a fork of
a process that touched CUDA) and supervises it. It loads the ``Runtime`` and hands
it to an ``EngineServer`` (``engine_server``: the receive loop on the main thread,
the model loop, the send loop, and the messages they speak).

Readiness is announced by writing ``ready <device> <visible CUDA devices>`` to
``--ready-fd`` after the models are loaded, warmed up and the socket is
listening. SIGTERM stops new work, lets the model loop finish what is queued,
sends the replies, removes the socket file and exits 0. If the model loop
dies, the process exits with ``ENGINE_EXIT_MODEL_LOOP_DIED`` so the supervisor
restarts it; a broken models file exits with ``ENGINE_EXIT_CONFIG`` at start-up
(not restarted).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from service import logs
from service.contract.errors import ConfigError
from service.contract.settings import Settings
from service.engine.engine_server import EngineServer
from service.engine.runtime import Runtime
from service.transport.interface import ENGINE_EXIT_CONFIG, ENGINE_EXIT_MODEL_LOOP_DIED

logger = logging.getLogger(__name__)


def _announce_ready(fd: int | None, runtime: Runtime) -> None:
    if fd is None:
        return
    import torch

    cuda_devices = torch.cuda.device_count() if runtime.device.type == "cuda" else 0
    device = str(runtime.device)
    if runtime.device.type == "cuda" and runtime.device.index is None:
        device = f"cuda:{torch.cuda.current_device()}"
    with os.fdopen(fd, "wb", buffering=0) as pipe:
        pipe.write(f"ready {device} {cuda_devices}\n".encode())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the gradcam-service engine process")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--device", help="cpu, cuda or cuda:N; default: the settings'")
    parser.add_argument("--ready-fd", type=int, help="write 'ready' here once serving")
    args = parser.parse_args(argv)
    logs.configure("INFO")
    # SIGTERM before the server exists (still loading) just ends the process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def died(error: BaseException) -> None:
        logger.critical("exiting: the model loop died")
        logging.shutdown()
        os._exit(ENGINE_EXIT_MODEL_LOOP_DIED)

    try:
        settings = Settings.from_env()
        runtime = Runtime(settings, device=args.device, on_fatal=died).start()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return ENGINE_EXIT_CONFIG
    server = EngineServer(runtime, args.socket)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    _announce_ready(args.ready_fd, runtime)
    started = time.monotonic()
    logger.info("engine serving on %s (pid %d, %s)", args.socket, os.getpid(), runtime.device)
    server.serve(settings.shutdown_timeout_s)
    logger.info("engine stopped after %.0f s", time.monotonic() - started)
    return 0
