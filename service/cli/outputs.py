"""The files ``explain`` writes: their names, the mark that says a file is one of them,
and the check, before any work, that a run overwrites nothing else.

Running a command twice must work: a second ``explain`` into the same folder replaces
the files an earlier ``explain`` wrote there (each PNG carries a ``Software`` text chunk
naming this program, a report its ``Manufacturer``), and stops at any other file of the
same name (a picture someone made or edited elsewhere, a file an older version wrote)
unless ``--force``: what it would lose is not ours to lose.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from service.cli.common import OutputExists
from service.imaging.dicom_codes import MANUFACTURER

KINDS = ("overlay", "heatmap")
# What follows ``<stem>.<label>.`` in the name of each file explain writes for a label.
_SUFFIXES = frozenset({*(f"{kind}.png" for kind in KINDS), "views.png", "heatmap.nii.gz"})
NIFTI_MAP = "heatmap.nii.gz"
VIEWS = "views.png"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# NIfTI-1's header: 348 bytes, its ``descrip`` (80 bytes) at byte 148.
_NIFTI_HEADER = 348
_DESCRIP = slice(148, 228)
# A DICOM input's report: ``<stem>.report.dcm`` (no label: one per input).
REPORT = "report.dcm"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A PNG's first chunk is IHDR (13 bytes of data): the mark goes right after it, where a
# reader finds it in the first bytes of the file.
_AFTER_IHDR = len(_PNG_SIGNATURE) + 4 + 4 + 13 + 4
_MARK_TEXT = b"Software\x00" + MANUFACTURER.encode("latin-1")
_MARK = (
    struct.pack(">I", len(_MARK_TEXT))
    + b"tEXt"
    + _MARK_TEXT
    + struct.pack(">I", zlib.crc32(b"tEXt" + _MARK_TEXT))
)


def safe(text: str) -> str:
    """A label as a part of a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _stem(path: Path) -> str:
    """An input's name less its suffix: ``ct.nii.gz`` → ``ct`` (not ``ct.nii``)."""
    for suffix in _NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return path.stem or path.resolve().name


def stems(paths: Sequence[Path]) -> list[str]:
    """Output name stems, one per input, never shared: inputs with the same name (from
    different folders, or the same file twice) get ``-2``, ``-3``, ... in input order."""
    found: list[str] = []
    for path in paths:
        base = _stem(path)
        stem, n = base, 1
        while stem in found:
            n += 1
            stem = f"{base}-{n}"
        found.append(stem)
    return found


def marked_png(data: bytes) -> bytes:
    """PNG bytes with the ``Software: gradcam-service`` text chunk (the pixels as given)."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG that starts with its IHDR chunk")
    return data[:_AFTER_IHDR] + _MARK + data[_AFTER_IHDR:]


def _marked_nifti(path: Path) -> bool:
    """Whether ``path`` is a gzipped NIfTI-1 file whose ``descrip`` is our mark."""
    try:
        with gzip.open(path, "rb") as file:
            header = file.read(_NIFTI_HEADER)
    except (OSError, EOFError, zlib.error):
        return False
    descrip = header[_DESCRIP].split(b"\x00", 1)[0]
    return len(header) == _NIFTI_HEADER and descrip == MANUFACTURER.encode("latin-1")


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is an output an earlier ``explain`` wrote (by its mark)."""
    if path.name.endswith(".nii.gz"):
        return _marked_nifti(path)
    if path.name.endswith(".png"):
        with path.open("rb") as file:
            head = file.read(_AFTER_IHDR + len(_MARK))
        return head.startswith(_PNG_SIGNATURE) and head[_AFTER_IHDR:] == _MARK
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
    except (InvalidDicomError, OSError, ValueError):
        return False
    return bool(header.get("Manufacturer") == MANUFACTURER)


def _is_output_of(name: str, stem: str) -> bool:
    """Whether a file named ``name`` is one ``explain`` may write for ``stem``, whatever
    the label (the labels of top-1 targets are known only afterwards)."""
    rest = name.removeprefix(stem + ".")
    if rest == name:
        return False
    label, _, kind = rest.partition(".")
    return rest == REPORT or (label == safe(label) and kind in _SUFFIXES)


def refuse_existing(out: Path, names: Sequence[str]) -> None:
    """Before any work: ``OutputExists`` if a file this run may write for the stems
    ``names`` is in ``out`` and was not written by an earlier run (``written_by_us``)."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if any(_is_output_of(entry.name, stem) for stem in names) and not (
            entry.is_file() and written_by_us(entry)
        ):
            raise OutputExists(
                f"{entry} exists and was not written by gradcam-service explain (--force "
                "overwrites it, or choose another --out)"
            )
