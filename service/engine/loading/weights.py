"""Find, read and load a model's weights: a torchvision weights name or a checkpoint file.

``weights`` names torchvision weights (downloaded, hash-checked) or a checkpoint
file (read by ``checkpoints``, whatever its extension); the state dict is fitted to
the architecture (a wrapper's key prefix, 3-channel weights folded into a
1-channel first convolution) and loaded strictly. Every mistake is a
``ModelConfigError`` on the ``weights`` key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from service.contract.checkpoint_format import weights_file
from service.contract.models_file import ModelsFile, ModelSpec
from service.engine.loading.architecture import first_conv
from service.engine.loading.checkpoints import (
    CheckpointError,
    check_shapes,
    fit_keys,
    read_checkpoint,
)
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.origins import origin_hint

logger = logging.getLogger(__name__)


def torchvision_weights(name: str, spec: ModelSpec, models: ModelsFile) -> Any | None:
    """The torchvision weights enum member named by ``spec.weights``, if it is one (a
    file of that name, whatever its extension, is a file)."""
    if spec.weights is None or weights_file(spec, models) is not None:
        return None
    import torchvision  # ~0.8 s (it imports torch._dynamo): only for its own weights

    try:
        enum = torchvision.models.get_model_weights(spec.arch)
    except (KeyError, ValueError):
        return None
    member = spec.weights.split(".")[-1]
    if member == "DEFAULT":
        return enum.DEFAULT
    if member in enum.__members__:
        return enum[member]
    raise ModelConfigError(
        name,
        "weights",
        f"'{spec.weights}' is neither a file nor a weights name of "
        f"{spec.arch}: {', '.join(enum.__members__)}",
    )


def download_state_dict(name: str, spec: ModelSpec, weights: Any) -> dict[str, Tensor]:
    """torchvision's weights ``weights`` (from torch's hub cache, else downloaded)."""
    try:
        state: dict[str, Tensor] = weights.get_state_dict(progress=False, check_hash=True)
        return state
    except (OSError, RuntimeError) as error:
        # URLError is an OSError; torch.hub raises RuntimeError on a bad hash.
        raise ModelConfigError(
            name,
            "weights",
            f"could not download torchvision weights {spec.arch} {weights.name} from "
            f"{weights.url} ({error}). Without internet access, download that file on a "
            'machine that has it and give its path: weights = "/path/to/file.pth" '
            "(or copy it into torch's hub cache, $TORCH_HOME/hub/checkpoints/)",
        ) from None


def read_state_dict(name: str, path: Path, written: str | None = None) -> dict[str, Tensor]:
    """The state dict of the checkpoint file at ``path`` (``written``: as the models file
    writes it)."""
    if not path.is_file():
        raise ModelConfigError(name, "weights", f"file {path} does not exist")
    try:
        return read_checkpoint(path, written)
    except CheckpointError as error:
        raise ModelConfigError(name, "weights", str(error)) from None


def _fit_first_conv(model: nn.Module, state: dict[str, Tensor], channels: int) -> None:
    """Fold 3-channel pretrained weights into a 1-channel first conv (sum over RGB)."""
    found = first_conv(model)
    if found is None:
        return
    key = f"{found[0]}.weight"
    weight = state.get(key)
    if weight is not None and weight.dim() == 4 and weight.shape[1] == 3 and channels == 1:
        state[key] = weight.sum(dim=1, keepdim=True)


def load_weights(
    name: str,
    model: nn.Module,
    state: dict[str, Tensor],
    source: str,
    channels: int,
    spec: ModelSpec | None = None,
) -> None:
    """Fit ``state`` (read from ``source``) to ``model`` and load it, strictly; a file
    that does not fit says which library's model its keys are, where that is known."""
    expected = model.state_dict()
    try:
        fitted = fit_keys(state, expected)
        state = fitted.state
        _fit_first_conv(model, state, channels)
        check_shapes(state, expected)
    except CheckpointError as error:
        hint = origin_hint(spec, state) if spec is not None else ""
        raise ModelConfigError(
            name, "weights", f"{source} does not fit the architecture: {error}{hint}"
        ) from None
    if fitted.change:
        logger.info(
            "model '%s': %s of every key of %s to fit the architecture", name, fitted.change, source
        )
    try:
        result = model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch lists every missing/unexpected key and shape mismatch; keep the first lines.
        detail = "; ".join(line.strip() for line in str(error).splitlines()[1:6] if line.strip())
        raise ModelConfigError(
            name, "weights", f"{source} does not fit the architecture: {detail}"
        ) from None
    del result
