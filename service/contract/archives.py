"""Model archives (a model's code and weights in one file), told apart by their entries
(no torch), and what the service says of each.

``torch.jit.save``, ``torch.export.save`` and ``torch.save`` all write zip files; the
names inside tell them apart: a TorchScript archive holds its compiled code
(``<root>/code/``), a torch.export archive says ``pt2`` in ``<root>/archive_format``
and holds ``<root>/models/<name>.json``, a checkpoint holds neither.

A torch.export archive is served (``library = "torch.export"``,
``engine/loading/libraries/from_torch_export.py``); a TorchScript archive is refused
wherever the models file names it, in one line: Grad-CAM captures a layer's output by a
forward hook, and torch.jit modules refuse forward hooks (``register_forward_hook is
not supported on ScriptModules``, torch 2.14) while their forward runs as compiled code
that calls no Python module.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

ArchiveKind = Literal["torchscript", "torch.export"]

EXPORT_LIBRARY = "torch.export"
# What a models file may call TorchScript, to be told why it is not served.
TORCHSCRIPT_NAMES = ("torchscript", "jit", "torch.jit")

_EXPORT_FORMAT = b"pt2"

WHY_NOT_TORCHSCRIPT = (
    "Grad-CAM cannot hook the layers of a scripted or traced model (torch.jit modules "
    "refuse forward hooks, and their forward runs as compiled code, so no layer's "
    "output can be captured)"
)
SHIP_INSTEAD = (
    "Ship its state_dict with the architecture by name (torch.save(model.state_dict(), "
    '"model.pth"); arch = "resnet50", weights = "model.pth"), or a torch.export archive '
    '(torch.export.save; library = "torch.export", arch = "model.pt2", see docs/models.md)'
)


def archive_kind(path: Path) -> ArchiveKind | None:
    """``path``'s kind if it is a TorchScript or a torch.export archive; None for any
    other file (a ``torch.save`` checkpoint among them) or one that cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names}
            for root in roots:
                format_file = f"{root}/archive_format"
                if format_file in names and archive.read(format_file).strip() == _EXPORT_FORMAT:
                    return "torch.export"
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    parts = [name.split("/") for name in names]
    if any(len(p) > 2 and p[1] == "code" for p in parts) or any(
        p[1:] == ["constants.pkl"] for p in parts
    ):
        return "torchscript"
    return None


def torchscript_refused(path: Path) -> str:
    """Why the TorchScript archive ``path`` is not served, and what to ship instead."""
    return f"{path} is a TorchScript archive; {WHY_NOT_TORCHSCRIPT}. {SHIP_INSTEAD}"


def not_weights(path: Path, kind: ArchiveKind, written: str) -> str:
    """What to do with an archive given as ``weights`` (which reads a state_dict);
    ``written``: the path as the models file writes it."""
    if kind == "torchscript":
        return torchscript_refused(path)
    return (
        f"{path} is a torch.export archive, not a state_dict: it is the model itself, with "
        f'its weights: library = "{EXPORT_LIBRARY}", arch = "{written}" (and no weights)'
    )
