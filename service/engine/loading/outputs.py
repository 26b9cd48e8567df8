"""What a loaded model's forward pass returns: logits or probabilities, and how many.

Grad-CAM needs the score before the final sigmoid/softmax. A model declared to
return probabilities is made to return the logits they come from (the input of
its final Sigmoid/Softmax module, or its output turned back); one declared to
return logits whose outputs look like probabilities gets a warning. The number of
outputs is read from one forward pass, which also checks ``channels`` and
``input_size``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from service.engine.loading.errors import ModelConfigError
from service.engine.loading.preprocessing import Preprocessing

logger = logging.getLogger(__name__)


# Heads that turn logits into probabilities, as modules (a hook can read their input).
_ACTIVATIONS = (nn.Sigmoid, nn.Softmax)
# Probabilities turned back into logits (a functional activation): kept off 0 and 1.
_EPS = 1e-7


def _final_activation(model: nn.Module, inputs: Tensor) -> tuple[tuple[str, nn.Module] | None, Any]:
    """One forward pass on ``inputs``: the Sigmoid or Softmax module whose output is the
    model's output, if there is one, and that output (None if the forward failed)."""
    seen: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, key=module_name: seen.__setitem__(key, out)
        )
        for module_name, module in model.named_modules()
        if isinstance(module, _ACTIVATIONS)
    ]
    try:
        with torch.no_grad():
            out = model(inputs)
    except Exception:
        return None, None  # output_classes reports a forward that fails
    finally:
        for handle in handles:
            handle.remove()
    for module_name, value in seen.items():
        if value is out:
            return (module_name, model.get_submodule(module_name)), out
    return None, out


def _return_input(_module: nn.Module, inputs: tuple[Any, ...], _output: Tensor) -> Tensor:
    result: Tensor = inputs[0]
    return result


def _inverse_sigmoid(_module: nn.Module, _inputs: tuple[Any, ...], output: Tensor) -> Tensor:
    return torch.logit(output, eps=_EPS)


def _log_probabilities(_module: nn.Module, _inputs: tuple[Any, ...], output: Tensor) -> Tensor:
    return torch.log(output.clamp_min(_EPS))


def expose_logits(name: str, model: nn.Module, shape: Preprocessing, multilabel: bool) -> None:
    """Make a model that returns probabilities return the logits they come from, so
    Grad-CAM's score is taken before the activation and the service applies it once."""
    final, _ = _final_activation(model, shape.zeros())
    if final is not None:
        module_name, module = final
        module.register_forward_hook(_return_input)
        kind = type(module).__name__
        logger.info(
            "model '%s': output = \"probabilities\": scores from the input of its final %s ('%s')",
            name,
            kind,
            module_name,
        )
        if (kind == "Softmax") == multilabel:
            logger.warning(
                "model '%s' ends in a %s but multilabel = %s: check 'multilabel' "
                "(true for independent sigmoid scores)",
                name,
                kind,
                str(multilabel).lower(),
            )
        return
    # A functional sigmoid/softmax in forward(): no module to read before; undo it.
    model.register_forward_hook(_inverse_sigmoid if multilabel else _log_probabilities)
    logger.warning(
        "model '%s': output = \"probabilities\" but no final Sigmoid/Softmax module was found; "
        "its outputs are turned back into %s, and saturated scores (exactly 0 or 1) give no "
        "gradient. A model that returns logits (or ends in an nn.Sigmoid/nn.Softmax module) "
        "avoids this",
        name,
        "log-odds" if multilabel else "log-probabilities",
    )


def warn_if_probabilities(
    name: str, model: nn.Module, shape: Preprocessing, multilabel: bool
) -> None:
    """A model declared to return logits whose outputs look like probabilities would get
    a second sigmoid/softmax (every score squeezed near 0.5–0.73): say so at load."""
    generator = torch.Generator().manual_seed(0)
    probes = torch.cat(
        [
            shape.zeros(),
            torch.full((1, shape.channels, *shape.input_size), 0.5),
            torch.randn(2, shape.channels, *shape.input_size, generator=generator),
        ]
    )
    final, out = _final_activation(model, probes)
    if final is not None:
        logger.warning(
            "model '%s' ends in a %s module ('%s'): its outputs are probabilities. "
            'Set output = "probabilities" in the models file, or every score gets a '
            "second %s",
            name,
            type(final[1]).__name__,
            final[0],
            "sigmoid" if multilabel else "softmax",
        )
        return
    if isinstance(out, Tensor) and out.numel() and bool(((out >= 0) & (out <= 1)).all()):
        logger.warning(
            "model '%s': its outputs on test inputs all lie in [0, 1], as "
            "probabilities do. If it returns probabilities, set output = "
            '"probabilities" in the models file (else each score gets a second %s)',
            name,
            "sigmoid" if multilabel else "softmax",
        )


def output_classes(name: str, model: nn.Module, shape: Preprocessing) -> int:
    """The number of outputs of one forward pass on a zero input of the spec's shape."""
    try:
        with torch.no_grad():
            out = model(shape.zeros())
    except Exception as error:
        raise ModelConfigError(
            name,
            "input_size",
            f"a forward pass on a (1, {shape.channels}, "
            f"{shape.input_size[0]}, {shape.input_size[1]}) input failed ({error}); check "
            "'channels' and 'input_size'",
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise ModelConfigError(name, "arch", "the model's output is not an (N, classes) tensor")
    return int(out.shape[1])


def pick_logits(name: str, model: nn.Module, shape: Preprocessing, key: str | int | None) -> None:
    """Make a model whose forward pass returns a tuple, a dict or an output object
    (transformers' ``ModelOutput``, MONAI's ViT's ``(logits, hidden states)``) return its
    logits, by a hook on its root (its modules keep their names): ``key`` where the models
    file names them (``logits``), else the ``logits`` field, else the one ``(N, classes)``
    tensor among the outputs. Nothing for a model that returns a tensor."""
    try:
        with torch.no_grad():
            out = model(shape.zeros())
    except Exception:
        return  # output_classes reports a forward that fails, with its shape
    if isinstance(out, Tensor):
        return
    where = key if key is not None else _find_logits(name, out)
    model.register_forward_hook(lambda _module, _inputs, output: _take(output, where))
    logger.info(
        "model '%s': its forward pass returns %s; the logits are its %r",
        name,
        type(out).__name__,
        where,
    )


def _take(output: Any, where: str | int) -> Any:
    if isinstance(where, int):
        return output[where]
    if isinstance(output, dict):
        return output[where]
    return getattr(output, where)


def _find_logits(name: str, out: Any) -> str | int:
    """Where the logits of ``out`` are, if that is unambiguous; else a mistake on
    ``logits`` that lists what there is."""
    if isinstance(getattr(out, "logits", None), Tensor):
        return "logits"
    items: list[tuple[str | int, Any]] = []
    if isinstance(out, dict):
        if isinstance(out.get("logits"), Tensor):
            return "logits"
        items = list(out.items())
    elif isinstance(out, tuple | list):
        items = list(enumerate(out))
    candidates = [k for k, v in items if isinstance(v, Tensor) and v.dim() == 2 and len(v) == 1]
    if len(candidates) == 1:
        return candidates[0]
    shown = ", ".join(
        f"{k!r}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}" for k, v in items
    )
    raise ModelConfigError(
        name,
        "logits",
        f"the model returns a {type(out).__name__} ({shown or 'no tensors'}) and its logits "
        'cannot be told apart: name them, e.g. logits = 0 or logits = "logits"',
    )
