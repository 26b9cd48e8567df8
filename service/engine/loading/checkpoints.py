"""Checkpoint files as people share them → a state_dict that fits the model.

What arrives in practice: ``.pt``, ``.pth``, ``.pth.tar``, ``.ckpt``, ``.bin`` or
``.safetensors`` files, whatever their name says (the format is read from the
content); the weights wrapped with training state (``{"epoch", "state_dict",
"optimizer", ...}``, Lightning's ``.ckpt``, ``{"model": ...}``, ``{"net": ...}``);
keys prefixed by the wrapper the model was trained in (``module.`` from
DataParallel, ``model.`` from Lightning, ``densenet121.`` from a CheXNet-style
class). ``fit_keys`` strips or adds the one prefix that makes the keys match the
architecture exactly, and nothing else; where none does, the error shows the
first few mismatches and the likely prefix, not hundreds of keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.contract.archives import archive_kind, not_weights
from service.contract.checkpoint_format import HEAD_BYTES, checkpoint_format, not_a_checkpoint

# Keys under which training scripts keep the weights, most specific first.
_WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "net",
    "network",
    "weights",
    "params",
    "module",
    "ema_state_dict",
    "ema",
)
_SHOWN = 3  # mismatches named in an error


class CheckpointError(ValueError):
    """A file that holds no usable weights, or weights that do not fit (the message says why)."""


def read_checkpoint(path: Path, written: str | None = None) -> dict[str, Tensor]:
    """The state_dict in ``path``, by content: safetensors, or torch's zip or legacy
    pickle format (loaded with ``weights_only``: no code from the file runs); a model
    archive is said to be one (``written``: the path as the models file writes it)."""
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    kind = checkpoint_format(head)
    if kind is None:
        raise CheckpointError(not_a_checkpoint(path, head))
    archive = archive_kind(path) if kind == "torch-zip" else None
    if archive is not None:
        raise CheckpointError(not_weights(path, archive, written or str(path)))
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "weights_only" in str(error):
            # Never pass on torch's advice to load with weights_only=False: that runs
            # whatever code the file holds, and a state_dict needs none.
            raise CheckpointError(
                f"{path} holds more than tensors (a pickled model or training objects), "
                "which the service does not unpickle (that could run code from the file): "
                "save model.state_dict() instead, or convert it to safetensors"
            ) from None
        raise CheckpointError(
            f"cannot read {path}: {type(error).__name__}: {str(error).splitlines()[0]}"
        ) from None
    return _unwrap(loaded, path)


def _tensors(value: Any) -> dict[str, Tensor] | None:
    """``value`` as a state_dict, if it is a mapping whose values are mostly tensors."""
    if not isinstance(value, Mapping) or not value:
        return None
    tensors = {str(k): v for k, v in value.items() if isinstance(v, Tensor)}
    return tensors if tensors and len(tensors) >= len(value) / 2 else None


def _unwrap(loaded: Any, path: Path, depth: int = 0) -> dict[str, Tensor]:
    direct = _tensors(loaded)
    if direct is not None:
        return direct
    if isinstance(loaded, Mapping) and depth < 3:
        for key in _WRAPPER_KEYS:
            if key in loaded:
                try:
                    return _unwrap(loaded[key], path, depth + 1)
                except CheckpointError:
                    continue
        nested = [v for v in loaded.values() if isinstance(v, Mapping) and _tensors(v)]
        if len(nested) == 1:  # one unnamed mapping of tensors among training state
            return _unwrap(nested[0], path, depth + 1)
    shown = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, Mapping) else ""
    what = f"a mapping with keys {shown}" if shown else type(loaded).__name__
    raise CheckpointError(
        f"{path} holds {what}, not a state_dict (a mapping of names to "
        f"tensors, possibly under one of {', '.join(_WRAPPER_KEYS[:5])}, ...)"
    )


@dataclass(frozen=True)
class FittedKeys:
    state: dict[str, Tensor]
    change: str | None  # what was done to the keys, for the log ("stripped 'module.'")


def _rename(state: Mapping[str, Tensor], strip: str, add: str) -> dict[str, Tensor]:
    return {add + k.removeprefix(strip): v for k, v in state.items()}


def _tails(key: str) -> list[tuple[str, str]]:
    """(prefix, rest) for each dot in ``key``: ``a.b.c`` → (``a.``, ``b.c``), (``a.b.``, ``c``)."""
    parts = key.split(".")
    return [(".".join(parts[:i]) + ".", ".".join(parts[i:])) for i in range(1, len(parts))]


def _candidates(given: set[str], expected: set[str]) -> list[tuple[str, str]]:
    """(strip, add) prefix pairs suggested by keys that match up to a prefix, commonest first."""
    found: Counter[tuple[str, str]] = Counter()
    for key in given:
        found.update((prefix, "") for prefix, rest in _tails(key) if rest in expected)
    for key in expected:
        found.update(("", prefix) for prefix, rest in _tails(key) if rest in given)
    return [pair for pair, _ in found.most_common(5)]


def fit_keys(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> FittedKeys:
    """``state`` with the one prefix change that makes its keys equal ``expected``'s;
    ``CheckpointError`` naming the first mismatches otherwise (shapes: ``check_shapes``)."""
    given, wanted = set(state), set(expected)
    if given == wanted:
        return FittedKeys(state, None)
    # The closest renaming so far, for the error: (keys, prefix stripped, prefix added).
    best: tuple[Mapping[str, Tensor], str, str] = (state, "", "")
    for strip, add in _candidates(given, wanted):  # one of the two is always empty
        if strip and not all(k.startswith(strip) for k in given):
            continue
        renamed = _rename(state, strip, add)
        if set(renamed) == wanted:
            change = f"stripped the prefix '{strip}'" if strip else f"added the prefix '{add}'"
            return FittedKeys(renamed, change)
        if len(set(renamed) & wanted) > len(set(best[0]) & wanted):
            best = (renamed, strip, add)
    raise CheckpointError(_mismatch(state, *best, wanted=wanted))


def _mismatch(
    state: Mapping[str, Tensor],
    renamed: Mapping[str, Tensor],
    strip: str,
    add: str,
    *,
    wanted: set[str],
) -> str:
    missing = sorted(wanted - set(renamed))
    unexpected = sorted(set(renamed) - wanted)
    parts = [
        f"{len(missing)} of the model's {len(wanted)} keys are missing and "
        f"{len(unexpected)} of the file's {len(state)} keys are unexpected"
    ]
    if strip or add:
        change = " and ".join(
            x
            for x in (f"stripping '{strip}'" if strip else "", f"adding '{add}'" if add else "")
            if x
        )
        parts.append(f"after {change} (the likely prefix)")
    if missing:
        parts.append(
            "missing: " + ", ".join(missing[:_SHOWN]) + (", ..." if len(missing) > _SHOWN else "")
        )
    if unexpected:
        parts.append(
            "unexpected: "
            + ", ".join(unexpected[:_SHOWN])
            + (", ..." if len(unexpected) > _SHOWN else "")
        )
    return "; ".join(parts)


def check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """``CheckpointError`` naming the first tensors whose shapes differ from the model's."""
    wrong = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        shown = "; ".join(
            f"{k}: {got} in the file, {want} in the model" for k, got, want in wrong[:_SHOWN]
        )
        more = f" (and {len(wrong) - _SHOWN} more)" if len(wrong) > _SHOWN else ""
        hint = ""
        head = list(expected)[-2:]  # the classifier's weight and bias, in most models
        if any(k in head and got[:1] != want[:1] for k, got, want in wrong):
            classes = next(got[0] for k, got, want in wrong if k in head)
            hint = f". The file has {classes} classes: set num_classes = {classes}"
        raise CheckpointError(f"{len(wrong)} tensor(s) have another shape: {shown}{more}{hint}")
