"""Every command's ``--help`` teaches: a description, examples that run, and every
option explained with its default. The parser is walked, so a new option without help
or a default in words fails here."""

from __future__ import annotations

import argparse
import shlex

import pytest

from service.cli.main import COMMANDS, main, parser

# Options whose absence is their default, or that need no default: flags, help, version.
_NO_VALUE = (
    argparse._HelpAction,
    argparse._VersionAction,
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
)


def _commands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help(command: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help as ``--help`` prints it (defaults expanded)."""
    formatter = command._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def test_every_command_is_walked() -> None:
    assert set(_commands()) == set(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_says_what_it_does_and_shows_examples(name: str) -> None:
    command = _commands()[name]
    assert command.description and len(command.description.splitlines()[0]) > 30
    assert command.epilog and command.epilog.startswith("examples:\n")
    examples = command.epilog.splitlines()[1:]
    assert examples
    for example in examples:
        words = shlex.split(example.split(" > ")[0])
        assert words[:2] == ["gradcam-service", name], example
        parser().parse_args(words[1:])  # exits (fails the test) if it does not parse
    text = command.format_help()
    assert "examples:\n  gradcam-service" in text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_explained_with_its_default(name: str) -> None:
    command = _commands()[name]
    for action in command._actions:
        if action.help == argparse.SUPPRESS:
            continue  # hidden on purpose (serve --model: refused with advice)
        if isinstance(action, _NO_VALUE):
            assert action.help, f"{name} {action.option_strings}: no help"
            continue
        where = f"{name} {action.option_strings or action.dest}"
        text = _help(command, action)
        assert len(text) > 15, f"{where}: no help"
        if action.option_strings and not action.required:
            # Shown by the formatter ("(default: 5)") or said in words ("default: the
            # model's"); never argparse's "(default: None)".
            assert "default" in text and "None" not in text, f"{where}: {text!r}"


def test_defaults_are_shown_as_values() -> None:
    explain = _commands()["explain"].format_help()
    assert "(default: gradcam-out)" in " ".join(explain.split())
    assert "(default: 5)" in explain and "(default: gradcam)" in explain


def test_serve_says_which_models_it_serves_and_refuses_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """serve serves every model of the models file (a request picks one): ``--model``
    was taken for ``--models`` (an abbreviation) and is now refused with what to do."""
    serve = _commands()["serve"]
    text = " ".join(serve.format_help().split())
    assert "Every model of --models is served" in text and "--model " not in text
    assert main(["serve", "--model", "phantom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: serve serves every model of the models file (--models FILE)")
    assert "a models file that holds only it" in err


def test_no_option_is_taken_for_another_by_its_prefix() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["explain", "x.png", "--mod", "phantom"])
