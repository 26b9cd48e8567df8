"""The parser of ``gradcam-service`` and the dispatch to its commands (one module each,
``add_parser`` and ``run``); every failure is one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from service import package_version
from service.cli import audit, body, common, explain, layers, sanity, serve
from service.cli.common import EXIT_INTERNAL, EXIT_INTERRUPTED, OutputExists, Usage
from service.contract.errors import ConfigError, ServiceError

# In the order ``--help`` lists them.
COMMANDS: dict[str, ModuleType] = {
    "explain": explain,
    "body": body,
    "layers": layers,
    "sanity": sanity,
    "serve": serve,
    "audit": audit,
}


def parser() -> argparse.ArgumentParser:
    """The whole command line (each command adds its own parser)."""
    top = argparse.ArgumentParser(
        prog="gradcam-service",
        description="Explain image classifiers with Grad-CAM: serve the HTTP API, explain "
        "image files, list a model's layers, check and audit the maps. Each command's "
        "--help says what it does, its options with their defaults, and examples.",
        epilog="exit codes: 0 done; 1 some inputs got an error (each on one line), the others "
        "done; 2 bad usage, settings or models file; 3 an output file exists (--force); "
        "70 internal failure; 130 interrupted",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit code (``EXIT_*``)."""
    args = parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    if args.command != "body":  # body prints nothing but the JSON
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        code: int = COMMANDS[args.command].run(args)
        return code
    except (ConfigError, ServiceError, Usage, OutputExists) as error:
        return common.told(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line, not a traceback; -v for the traceback
        if verbose:
            logging.getLogger(__name__).exception("internal failure")
        print(
            f"error: internal failure: {type(error).__name__}: {error} (-v shows where)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
