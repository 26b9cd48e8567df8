"""The API's sentences in the command line's words: the file's name for "Image i", a flag
for a quoted field; what is not about an image or a field passes unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.cli.wording import about_command, about_file
from service.contract.errors import ErrorCode, InvalidField
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


@pytest.mark.parametrize(
    "error, told",
    [
        (
            InvalidField(
                "Model 'ct3d' explains volumes: images[2] is no volume. Send a NIfTI file "
                '(.nii or .nii.gz), a series as {"series": [...]}, or use a 2-D model '
                "(GET /v1/models).",
                code=ErrorCode.VOLUME_REQUIRED,
            ),
            "scan.png: Model 'ct3d' explains volumes: it is no volume. Give a NIfTI file (.nii, "
            ".nii.gz), a multi-frame DICOM file or a folder holding one DICOM series' files, or "
            "a 2-D model (--model).",
        ),
        (
            InvalidField(
                "Model 'phantom' explains 2-D images: images[0] is a volume (NIfTI). Send it to "
                "a volume model (GET /v1/models: an input_size of three numbers).",
                code=ErrorCode.IMAGE_REQUIRED,
            ),
            "scan.png: Model 'phantom' explains 2-D images: it is a volume (NIfTI). Give it to "
            "a volume model (--model; gradcam-service layers --model NAME shows a model's "
            "input: a volume model's has a depth).",
        ),
        (
            InvalidField("Volume 0 is not a NIfTI file that can be read: it is truncated."),
            "scan.png is not a NIfTI file that can be read: it is truncated.",
        ),
        (
            InvalidField("The volume in images[0] has values that are not finite numbers."),
            "scan.png: The volume in scan.png has values that are not finite numbers.",
        ),
    ],
)
def test_a_volume_s_error_is_told_in_the_command_line_s_words(
    error: InvalidField, told: str
) -> None:
    """No request field (images[i]) and no advice for an API client ({"series": ...},
    GET /v1/models): the file, and what to give the command instead."""
    assert about_file(Path("scan.png"), error) == told
