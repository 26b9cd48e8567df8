"""gradcam-service layers: the model's layers with their shapes, the default marked."""

from __future__ import annotations

import pytest

from service.cli import main


def test_layers_lists_shapes_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "* features " in out and "128×16×16" in out
    assert "features.stage2" in out
