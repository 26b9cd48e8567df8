"""The image files a trust command (``sanity``, ``audit``) is given: folders searched
recursively for image suffixes, and files named, each keyed by how it is shown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# What a folder's files are taken as images by (anything given by name is tried; DICOM
# files often have no suffix: name them).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
)


class NoSuchInput(ValueError):
    """A name that is neither a file nor a folder, or two inputs with one key."""


def image_files(names: Sequence[str]) -> list[tuple[str, Path]]:
    """``(key, path)`` in order: a folder's images sorted, keyed by their path inside it;
    a file keyed by its name as given."""
    found: list[tuple[str, Path]] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found.extend(
                (entry.relative_to(path).as_posix(), entry)
                for entry in sorted(path.rglob("*"))
                if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.append((name, path))
        else:
            raise NoSuchInput(f"{name}: no such file or folder")
    keys = [key for key, _ in found]
    if len(set(keys)) != len(keys):
        raise NoSuchInput("two inputs have the same name; give one folder, or distinct files")
    return found
