"""What the commands share: exit codes, the errors that stop a command before any work,
how such an error is told, how a command's ``--help`` reads (a description, its options'
defaults, examples), the model options, the engine in this process."""

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


class Help(argparse.HelpFormatter):
    """``--help`` as a user reads it: paragraphs wrapped to the terminal, examples (lines
    indented by two spaces) as written, one per line, and each option's default shown,
    unless its help already says what the default is (a default of ``None`` is no value
    to show: such help says "default: ..." in words)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if "\n  " in paragraph:
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_command(
    sub: Subparsers, name: str, summary: str, examples: Sequence[str], details: str = ""
) -> argparse.ArgumentParser:
    """A command's parser: ``summary`` is its line in ``gradcam-service --help`` and the
    first line of its own ``--help``, ``details`` the paragraph after it, ``examples``
    command lines shown under "examples:" (``tests/unit/cli/test_help.py`` parses each)."""
    return sub.add_parser(
        name,
        # "--model" must never be taken for "--models": no abbreviations.
        allow_abbrev=False,
        help=summary,
        description=f"{summary}\n\n{details}" if details else summary,
        epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=Help,
    )


def add_models_file_options(parser: argparse.ArgumentParser) -> None:
    """Which models file, on which device: the options of every command that loads models."""
    parser.add_argument(
        "--models",
        metavar="FILE",
        help="models file (TOML, docs/models.md) describing your models; default: "
        "$GRADCAM_MODELS_FILE if set, else the bundled demo model 'phantom'",
    )
    parser.add_argument(
        "--device",
        **one_of(get_args(Device)),
        help="where the model runs; default: $GRADCAM_DEVICE if set, else auto (the "
        "first GPU if there is one, else the CPU)",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that explains with one model of the models file."""
    add_models_file_options(parser)
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="which model of the models file; default: the one marked default = true",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log model loading; an internal failure shows its traceback",
    )


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings (``GRADCAM_*``) with the command's --models and --device."""
    return Settings.from_env(models_file=args.models, device=args.device)


def model_name(args: argparse.Namespace) -> str:
    """The model ``--model`` names (or the models file's default), checked before any
    model loads; ``Usage`` in the command line's words: which file was read, its models,
    and how to bring another (the API's "Models served" means nothing here)."""
    settings = settings_of(args)
    config = settings.models_config()
    chosen: str = args.model or config.default_model
    if chosen in config.models:
        return chosen
    where = (
        f"the models file {settings.models_file}"
        if settings.models_file
        else "the bundled demo models file"
    )
    advice = (
        ""
        if settings.models_file
        else " To explain with a model of your own, describe it in a models file and give "
        "--models FILE (docs/models.md)."
    )
    close = did_you_mean(close_matches(chosen, config.models))
    raise Usage(
        f"there is no model '{chosen}' in {where}.{close} "
        f"Its models: {', '.join(config.models)}.{advice}"
    )


def runtime(args: argparse.Namespace) -> Runtime:
    """The engine in this process (``serve`` runs it in engine processes instead)."""
    from service.engine.runtime import Runtime

    return Runtime(settings_of(args)).start()
