"""What the commands share: exit codes, the errors that stop a command before any work,
how such an error is told, the model options, the engine in this process."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, get_args

from service.contract.errors import ConfigError, ServiceError
from service.contract.settings import Device, Settings
from service.contract.suggestions import close_matches, did_you_mean

if TYPE_CHECKING:  # torch is imported only by the commands that run the model here
    from service.engine.runtime import Runtime

# 0 done; 1 some inputs (or the request) got an error, each told on one line, the
# others done; 2 bad usage, settings or models file, nothing done; 3 an output file
# exists (--force overwrites); 70 an internal failure; 130 interrupted.
EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_EXISTS, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130

Subparsers = argparse._SubParsersAction  # what each command adds its parser to


class Usage(Exception):
    """A command line that cannot be run as given (exit code 2)."""


class OutputExists(Exception):
    """An output file is there already and ``--force`` was not given (exit code 3)."""


def told(error: ConfigError | ServiceError | Usage | OutputExists | OSError) -> int:
    """One line on stderr for a command that could not go on, and its exit code."""
    if isinstance(error, OSError):  # the output folder cannot be written, say
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_INPUT
    message = error.message if isinstance(error, ServiceError) else str(error)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_EXISTS if isinstance(error, OutputExists) else EXIT_USAGE


def one_of(options: Sequence[str]) -> dict[str, Any]:
    """argparse keywords for a value from ``options``: a mistake names the close matches
    ("'gradcm' is not one of ...: did you mean 'gradcam'?"), which ``choices`` does not."""

    def parse(value: str) -> str:
        if value in options:
            return value
        raise argparse.ArgumentTypeError(
            f"'{value}' is not one of {', '.join(options)}."
            f"{did_you_mean(close_matches(value, options))}"
        )

    parse.__name__ = "value"  # argparse's "invalid value" if the message is lost
    return {"type": parse, "metavar": "{" + ",".join(options) + "}"}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model."""
    parser.add_argument("--models", help="models file (TOML); default: the bundled demo model")
    parser.add_argument("--model", help="model name; default: the models file's default")
    parser.add_argument("--device", **one_of(get_args(Device)), help="default: auto")
    parser.add_argument("-v", "--verbose", action="store_true", help="log model loading")


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings (``GRADCAM_*``) with the command's --models and --device."""
    return Settings.from_env(models_file=args.models, device=args.device)


def runtime(args: argparse.Namespace) -> Runtime:
    """The engine in this process (``serve`` runs it in engine processes instead)."""
    from service.engine.runtime import Runtime

    return Runtime(settings_of(args)).start()
