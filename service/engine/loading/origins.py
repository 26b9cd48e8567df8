"""Which library a checkpoint's keys come from, for the one line that says why a weights
file does not fit.

Architectures of one name differ between libraries: torchvision's ``convnext_tiny``
names its tensors ``features.0.0.weight``, timm's ``stem.0.weight``. A file of one under
the other fits none of its keys, and "182 of the model's 182 keys are missing" does not
say what to change. So when almost nothing fits, the same ``arch`` is built (on the meta
device: no memory, no time) in each other library that has it, and the one whose keys
the file's are is named; a Hugging Face checkpoint is known by its ``<type>.embeddings``
keys.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from service.contract.models_file import ModelSpec

# A share of the file's keys that must be the candidate's for it to be named.
_MOST = 0.9
_HUGGING_FACE = re.compile(r"^(?P<type>[a-z0-9_]+)\.(embeddings|encoder|stem|embedder)\.")


def origin_hint(spec: ModelSpec, state: dict[str, Tensor]) -> str:
    """ " (its keys are those of timm's 'convnext_tiny': set library = "timm")", or ""."""
    keys = set(state)
    for library, build in _same_arch(spec):
        try:
            with torch.device("meta"):
                model = build()
        except Exception:  # that library cannot build it this way: not the one
            continue
        theirs = set(model.state_dict())
        if keys and len(keys & theirs) >= _MOST * len(keys):
            return f' (its keys are those of {library}\'s "{spec.arch}": set library = "{library}")'
    found = {m.group("type") for key in keys if (m := _HUGGING_FACE.match(key))}
    if len(found) == 1 and spec.library != "transformers":
        kind = found.pop()
        return (
            f' (its keys are a Hugging Face {kind} model\'s: library = "transformers" with arch '
            "its save_pretrained folder)"
        )
    return ""


def _same_arch(spec: ModelSpec) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The other libraries that have an architecture of this name, with its builder."""
    import torchvision  # ~0.8 s (it imports torch._dynamo): only to explain a failure

    found: list[tuple[str, Callable[[], nn.Module]]] = []
    if spec.library != "torchvision" and spec.arch in torchvision.models.list_models():
        found.append(("torchvision", lambda: torchvision.models.get_model(spec.arch)))
    if spec.library != "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            timm = None
        if timm is not None and timm.is_model(spec.arch):
            found.append(("timm", lambda: timm.create_model(spec.arch, pretrained=False)))
    return found
