"""What kind of file a checkpoint is, from its first bytes (no torch).

``serve`` checks every weights file with this before any engine starts (a file that is
no checkpoint is an error in well under a second, not after a model load), and the
engine reads each file by the format found here (``engine/checkpoints.py``), whatever
its name says. A zip file may be a model archive instead (``archives.py``): said so,
as weights and as a torch.export archive alike.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

from service.contract.archives import archive_kind, torchscript_refused
from service.contract.models_file import ModelsFile, ModelSpec

CheckpointFormat = Literal["safetensors", "torch-zip", "torch-pickle"]

# What torch.save writes (a zip archive since torch 1.6; a pickle before) and what
# safetensors writes (an 8-byte little-endian header length, then a JSON header).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80
HEAD_BYTES = 16


def checkpoint_format(head: bytes) -> CheckpointFormat | None:
    """The format of a file that starts with ``head`` (its first 16 bytes), or None."""
    if len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 28:
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head[:1] == bytes([_PICKLE_PROTOCOL]) and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-pickle"
    return None


def describe_head(head: bytes) -> str:
    """What a file that is no checkpoint starts with, for the error message."""
    if not head:
        return "it is empty"
    text = head[:12].decode("ascii", errors="replace")
    if text.isprintable():
        return f"it starts with the text {text!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def not_a_checkpoint(path: Path, head: bytes) -> str:
    return (
        f"{path} is not a checkpoint ({describe_head(head)}): give a file written by "
        "torch.save(model.state_dict(), ...) or safetensors"
    )


# Extensions checkpoints are shared with (the content decides how a file is read).
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".safetensors", ".bin", ".pkl")


def weights_file(spec: ModelSpec, models: ModelsFile) -> Path | None:
    """The file ``weights`` names, or None: no weights, or a name that may be torchvision
    weights ("DEFAULT", "IMAGENET1K_V2"; the engine asks torchvision). A value with a
    checkpoint's extension or a slash, a file that exists, or any value for a model of
    one's own code (``module:function``) is a file."""
    if spec.weights is None:
        return None
    path = models.resolve_path(spec.weights)
    value = spec.weights.lower()
    if ":" in spec.arch or value.endswith(_CHECKPOINT_SUFFIXES) or "/" in value or "\\" in value:
        return path
    return path if path.exists() else None


def not_an_export_archive(path: Path) -> str | None:
    """Why the file ``path`` cannot be read as a torch.export archive; None if it is one."""
    kind = archive_kind(path)
    if kind == "torch.export":
        return None
    if kind == "torchscript":
        return torchscript_refused(path)
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    found = checkpoint_format(head)
    if found == "torch-zip" and not zipfile.is_zipfile(path):
        return (
            f"{path} is a damaged zip archive (truncated or corrupt): write it again "
            "with torch.export.save"
        )
    if found is not None:
        return (
            f"{path} is a checkpoint (a state_dict), not a torch.export archive: give it as "
            "weights with the architecture by name (arch, and library if not torchvision), "
            "or export the model: torch.export.save(torch.export.export(model.eval(), (x,), "
            'dynamic_shapes=...), "model.pt2"), see docs/models.md'
        )
    return (
        f"{path} is not a torch.export archive ({describe_head(head)}): give a file "
        "written by torch.export.save"
    )
