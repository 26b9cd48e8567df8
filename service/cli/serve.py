"""``gradcam-service serve``: check everything that can be checked, then become the
supervisor of the engine process(es) and gunicorn (``supervision/``)."""

from __future__ import annotations

import argparse
import os
import sys

from service.cli import common
from service.cli.common import Subparsers
from service.contract.settings import Settings
from service.server.security import AccessPolicy
from service.supervision.preflight import preflight

# The flags of serve, as the settings they set.
_FLAGS = ("models", "device", "host", "port", "workers", "threads", "engines")


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser("serve", help="run the HTTP API on gunicorn")
    common.add_model_options(parser)
    parser.add_argument(
        "--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in a container)"
    )
    parser.add_argument("--port", type=int, help="default 8000")
    parser.add_argument("--workers", type=int, help="HTTP worker processes; default: one per core")
    parser.add_argument("--threads", type=int, help="request threads per HTTP worker; default 16")
    parser.add_argument(
        "--engines", type=int, help="engine processes; default: one per GPU, or one on the CPU"
    )


def run(args: argparse.Namespace) -> int:
    """exec() the supervisor: a fresh interpreter, so that its metrics find their
    multiprocess folder (prometheus_client reads it at import) and nothing this
    command imported stays in memory."""
    overrides = {
        ("models_file" if flag == "models" else flag): getattr(args, flag) for flag in _FLAGS
    }
    # A bad flag, variable, tokens file, models file, weights file, device or a port in
    # use stops here, with its name, before any process starts (preflight.py).
    settings = Settings.from_env(**overrides)
    AccessPolicy(settings)
    preflight(settings)
    env = {**os.environ, **settings.to_env(k for k, v in overrides.items() if v is not None)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "service.supervision"], env)
    return 0  # not reached
