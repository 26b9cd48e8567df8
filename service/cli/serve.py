"""``gradcam-service serve``: check everything that can be checked, then become the
supervisor of the engine process(es) and gunicorn (``supervision/``)."""

from __future__ import annotations

import argparse
import os
import sys

from service.cli import common
from service.cli.common import Subparsers, Usage
from service.contract.settings import Settings
from service.server.security import AccessPolicy
from service.supervision.preflight import preflight

# The flags of serve, as the settings they set.
_FLAGS = ("models", "device", "host", "port", "workers", "threads", "engines")


def add_parser(sub: Subparsers) -> None:
    parser = common.add_command(
        sub,
        "serve",
        "run the HTTP API (and the web page at /) on every model of the models file",
        [
            "gradcam-service serve",
            "gradcam-service serve --models models.toml --host 0.0.0.0 --port 8080",
        ],
        "Checks the port, the models file and its weights first (exit code 2 naming the "
        "fix), then starts the engine process(es) and gunicorn and supervises them; "
        "Ctrl-C or SIGTERM drains and stops. Every model of --models is served: a "
        'request picks one with its "model" field, else gets the file\'s default '
        "(default = true). Each flag overrides its GRADCAM_* variable (docs/settings.md).",
    )
    common.add_models_file_options(parser)
    # Not an option of serve, but the one a user of explain tries: told what to do instead.
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument(
        "--host",
        help="address to listen on; default: $GRADCAM_HOST, else 127.0.0.1 (this machine "
        "only; 0.0.0.0 for every interface, as in a container)",
    )
    parser.add_argument("--port", type=int, help="TCP port; default: $GRADCAM_PORT, else 8000")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="HTTP worker processes; default: $GRADCAM_WORKERS, else one per core",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="request threads per HTTP worker; default: $GRADCAM_THREADS, else 16",
    )
    parser.add_argument(
        "--engines",
        type=int,
        metavar="E",
        help="engine processes (each loads every model); default: $GRADCAM_ENGINES, else "
        "one per GPU, or one on the CPU",
    )


def run(args: argparse.Namespace) -> int:
    """exec() the supervisor: a fresh interpreter, so that its metrics find their
    multiprocess folder (prometheus_client reads it at import) and nothing this
    command imported stays in memory."""
    if args.model is not None:
        raise Usage(
            "serve serves every model of the models file (--models FILE): a request picks "
            'one with its "model" field, and gets the file\'s default (default = true) '
            "without one. To serve one model only, give a models file that holds only it."
        )
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
