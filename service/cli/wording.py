"""The API's error sentences in the command line's words.

The commands explain files through the API's own stages, whose errors speak to a client
of ``POST /v1/explain``: "Image 0 is a DICOM file with 30 frames; say which one to
explain with "frame"". On the command line there is a file name, not an index, and a
flag, not a field: "scan.dcm is a DICOM file with 30 frames; say which one to explain
with --frame".
"""

from __future__ import annotations

import re
from pathlib import Path

from service.contract.errors import ServiceError

# A request field as the API's messages quote it, and the flag that sets it here.
_FLAGS = {
    "frame": "--frame",
    "targets": "--target",
    "layer": "--layer",
    "method": "--method",
    "model": "--model",
    "top_k": "--top-k",
}
_IMAGE = re.compile(r"^Image \d+(:?)")


def _flags(message: str) -> str:
    for field, flag in _FLAGS.items():
        message = message.replace(f'"{field}"', flag)
    return message


def about_file(path: Path, error: OSError | ServiceError) -> str:
    """What to tell of a file that failed, with its name where the API says "Image i"
    (and no "error:" prefix): ``scan.dcm is a DICOM file with ...``."""
    if not isinstance(error, ServiceError):
        return f"{path}: {error.strerror or error}"
    message = _flags(error.message)
    if _IMAGE.match(message):
        # "Image 0 is ..." → "scan.dcm is ..."; "Image 0: model ..." → "scan.dcm: model ...".
        return _IMAGE.sub(lambda found: f"{path}{found.group(1)}", message, count=1)
    return f"{path}: {message}"


def about_command(error: ServiceError) -> str:
    """An error of the command line's choices (``--layer``, ``--target``, ...), checked on
    a stand-in image 0 before any file: told without the image."""
    return _flags(re.sub(r"^Image \d+: ", "", error.message, count=1))
