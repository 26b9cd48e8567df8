"""The API's error sentences in the command line's words.

The commands explain files through the API's own stages, whose errors speak to a client
of ``POST /v1/explain``: "Image 0 is a DICOM file with 30 frames; say which one to
explain with "frame"". On the command line there is a file name, not an index, and a
flag, not a field: "scan.dcm is a DICOM file with 30 frames; say which one to explain
with --frame". A volume model's errors say "Volume i" and "images[i]"; a file of the
wrong kind for the model (a PNG for a volume model, a NIfTI file for a 2-D one) gets the
command line's advice instead of the API's (a request's forms, GET /v1/models).
"""

from __future__ import annotations

import re
from pathlib import Path

from service.contract.errors import ErrorCode, ServiceError

# A request field as the API's messages quote it, and the flag that sets it here.
_FLAGS = {
    "frame": "--frame",
    "targets": "--target",
    "layer": "--layer",
    "method": "--method",
    "model": "--model",
    "top_k": "--top-k",
}
_IMAGE = re.compile(r"^(?:Image|Volume) \d+(:?)")
_FIELD = re.compile(r"\bimages\[\d+\]")
# What to do about a file of the wrong kind for the model, on the command line.
_WRONG_KIND = {
    ErrorCode.VOLUME_REQUIRED: "Give a NIfTI file (.nii, .nii.gz), a multi-frame DICOM file "
    "or a folder holding one DICOM series' files, or a 2-D model (--model).",
    ErrorCode.IMAGE_REQUIRED: "Give it to a volume model (--model; gradcam-service layers "
    "--model NAME shows a model's input: a volume model's has a depth).",
}


def _flags(message: str) -> str:
    for field, flag in _FLAGS.items():
        message = message.replace(f'"{field}"', flag)
    return message


def about_file(path: Path, error: OSError | ServiceError) -> str:
    """What to tell of a file that failed, with its name where the API says "Image i"
    (and no "error:" prefix): ``scan.dcm is a DICOM file with ...``."""
    if not isinstance(error, ServiceError):
        return f"{path}: {error.strerror or error}"
    if error.code in _WRONG_KIND:
        # The API's first sentence says what is wrong; the rest is advice for a client.
        said = _FIELD.sub("it", error.message.split(". ", 1)[0].rstrip("."))
        return f"{path}: {said}. {_WRONG_KIND[error.code]}"
    message = _FIELD.sub(str(path), _flags(error.message))
    if _IMAGE.match(message):
        # "Image 0 is ..." → "scan.dcm is ..."; "Image 0: model ..." → "scan.dcm: model ...".
        return _IMAGE.sub(lambda found: f"{path}{found.group(1)}", message, count=1)
    return f"{path}: {message}"


def about_command(error: ServiceError) -> str:
    """An error of the command line's choices (``--layer``, ``--target``, ...), checked on
    a stand-in image 0 before any file: told without the image."""
    return _flags(re.sub(r"^Image \d+: ", "", error.message, count=1))
