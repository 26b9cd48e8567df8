"""The API's sentences in the command line's words: the file's name for "Image i", a flag
for a quoted field; what is not about an image or a field passes unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.cli.wording import about_command, about_file
from service.contract.errors import InvalidField
from tests.helpers import EXAMPLES


@pytest.mark.parametrize(
    "message, told",
    [
        (
            'Image 3 is a DICOM file with 30 frames; say which one to explain with "frame" '
            "(0..29).",
            "scan.dcm is a DICOM file with 30 frames; say which one to explain with --frame "
            "(0..29).",
        ),
        (
            "Image 12: model 'phantom' has no class 'x'.",
            "scan.dcm: model 'phantom' has no class 'x'.",
        ),
        ("The server said no.", "scan.dcm: The server said no."),
    ],
)
def test_a_files_error_names_the_file_and_the_flag(message: str, told: str) -> None:
    assert about_file(Path("scan.dcm"), InvalidField(message)) == told


def test_a_missing_file_is_told_by_the_system() -> None:
    error = FileNotFoundError(2, "No such file or directory", "a.png")
    assert about_file(Path("a.png"), error) == "a.png: No such file or directory"


def test_an_option_error_drops_the_stand_in_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert about_command(InvalidField("Image 0: class index 9 is outside 0..3.")) == (
        "class index 9 is outside 0..3."
    )
    image = str(EXAMPLES / "phantom_nodule.png")
    assert main(["explain", image, "--target", "pneumonia", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'phantom' has no class 'pneumonia'."), err
