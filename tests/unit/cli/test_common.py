"""What the commands share: an unknown --model is told in the command line's words (the
models file read, its models, how to bring one) before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.demo import __file__ as demo_package
from tests.helpers import EXAMPLES

SHORTCUT_FILE = Path(demo_package).with_name("shortcut.toml")


@pytest.mark.parametrize("command", ["explain", "layers", "sanity"])
def test_an_unknown_model_names_the_models_file_and_how_to_bring_one(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import common

    def never(args: object) -> None:
        raise AssertionError("a model was loaded for a name that is not there")

    monkeypatch.setattr(common, "runtime", never)
    monkeypatch.delenv("GRADCAM_MODELS_FILE", raising=False)
    image = str(EXAMPLES / "phantom_nodule.png")
    args = {"explain": [image], "layers": [], "sanity": ["--images", image]}[command]
    assert main([command, *args, "--model", "resnet"]) == 2
    assert capsys.readouterr().err == (
        "error: there is no model 'resnet' in the bundled demo models file. Its models: "
        "phantom. To explain with a model of your own, describe it in a models file and "
        "give --models FILE (docs/models.md).\n"
    )


def test_an_unknown_model_of_a_models_file_suggests_its_close_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["layers", "--models", str(SHORTCUT_FILE), "--model", "phantom_shortcu"]) == 2
    assert capsys.readouterr().err == (
        f"error: there is no model 'phantom_shortcu' in the models file {SHORTCUT_FILE}. "
        "Did you mean 'phantom_shortcut' or 'phantom'? Its models: phantom, phantom_shortcut.\n"
    )
