"""The command line's entry point: an internal failure is one line and exit code 70."""

from __future__ import annotations

import pytest

from service.cli import main


def test_an_internal_failure_is_one_line_and_exit_code_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import common

    def broken(args: object) -> None:
        raise RuntimeError("something no one expected")

    monkeypatch.setattr(common, "runtime", broken)
    assert main(["layers"]) == 70
    err = capsys.readouterr().err
    assert err == (
        "error: internal failure: RuntimeError: something no one expected (-v shows where)\n"
    )
