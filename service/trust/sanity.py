"""The model-parameter randomisation test (Adebayo et al., 2018, "Sanity checks for
saliency maps"), cascading from the output.

An explanation of a model must change when the model's learned weights are
destroyed. Step 0 explains some images with the trained model; step ``k`` explains
them again after the ``k`` groups of layers nearest the output are re-initialised,
each step adding the next group down, and compares every map with its original
(``similarity.py``; ``report.py`` for the verdict).

Choices, and why:

- **Which layers, in which order**: the modules with parameters of their own (and
  batch norms keeping running statistics without an affine part), in the order
  their forward passes finish during one probe pass (hooks), not the order of
  ``named_modules()``, which is the order of assignment in ``__init__``, not of
  use. Modules that do not run (an auxiliary head in eval mode) cannot change a
  map and are left out.
- **Groups**: by default one group per parameterised layer, with a normalisation
  layer (batch, group, layer or instance norm) joined to the layer that ran just
  before it: a convolution and its batch norm are one learned step of the
  network, and are named together (``features.stem.0+1``). ``depth=N`` groups
  instead by the first ``N`` parts of the names (2: the demo's stages, ResNet's
  bottleneck blocks, Adebayo et al.'s Inception blocks), for deep models where a
  step per layer is many steps.
- **Re-initialising**: each module's own ``reset_parameters()`` (its
  initialisation, as when the model was built), under a seed made from ``seed``
  and the step, on a CPU copy of the module, so a seed gives the same weights on
  any device. A module without ``reset_parameters()`` gets a random permutation
  of each of its own parameters' values: its scale stays, what it learned goes.
- **Batch norms** go back to their initial state as well: weight 1, bias 0,
  running mean 0, running variance 1, i.e. the identity (up to ``eps``) in eval
  mode. Their statistics and affine part are learned from the data as much as a
  convolution's weights; keeping them would keep part of the trained model. A
  model whose batch norms were folded into their convolutions at load
  (``engine/folding.py``) is randomised as it runs: the folded convolution is
  re-initialised (a bias included) and forgets the batch norm it absorbed.
- **Maps**: the class the ORIGINAL model predicted (top-1 logit) or a given
  target is explained at every step, with the same layer and method, by the
  service's ``GradCAM`` engine, in batches; each map is upsampled to the model
  input (``imaging.render.resample``, bilinear as the service draws) and
  normalised to [0, 1] (``render.normalise``) before it is compared.
- **Constant maps**: see ``report.Step`` (a randomised one counts as Spearman 0)
  and ``report.SanityReport.skipped`` (an original one leaves its image out).

The served model is never touched: the cascade runs on a deep copy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from service.engine.folding import forget_folded
from service.engine.gradcam import GradCAM
from service.engine.layers import resolve_layer
from service.engine.loading.models import LoadedModel
from service.imaging.geometry import fit_geometry
from service.imaging.render import normalise, resample
from service.trust.report import SanityReport, Step
from service.trust.similarity import spearman, ssim

logger = logging.getLogger(__name__)

# (module, inputs (N, C, H, W) on its device, target class per image) → (N, h, w) maps.
Explainer = Callable[[nn.Module, Tensor, Sequence[int]], Tensor]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
BATCH_SIZE = 16


class NothingToCompare(ValueError):
    """Every original map is constant: no image has a map to compare."""


@dataclass(frozen=True)
class LayerGroup:
    """Modules re-initialised together at one step, in forward order."""

    name: str
    modules: tuple[str, ...]
    above_target: bool  # every module of it runs after the explained layer is done


def _learns(module: nn.Module) -> bool:
    if next(module.parameters(recurse=False), None) is not None:
        return True
    # A batch norm without an affine part still learned its running statistics.
    return isinstance(module, _NORMS) and any(True for _ in module.buffers(recurse=False))


def _forward_order(model: nn.Module, probe: Tensor, target: str) -> tuple[list[str], int]:
    """The learning modules in the order their forward passes finish, and how many of
    them finish before the ``target`` layer does."""
    modules = dict(model.named_modules())
    watched = [name for name, module in modules.items() if name and _learns(module)]
    learning = set(watched)
    order: list[str] = []
    target_done: list[int] = []
    handles = []

    def on_done(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if name in learning and name not in order:
                order.append(name)
            if name == target and not target_done:
                target_done.append(len(order))  # the target itself is not above itself

        return hook

    try:
        for name in dict.fromkeys([*watched, target]):
            handles.append(modules[name].register_forward_hook(on_done(name)))
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not target_done:
        raise ValueError(f"layer '{target}' did not run in the forward pass")
    return order, target_done[0]


def _group_name(names: Sequence[str]) -> str:
    """``features.stem.0`` and ``features.stem.1`` → ``features.stem.0+1``."""
    first = names[0]
    parent = first.rpartition(".")[0]
    rest = [n[len(parent) + 1 :] if parent and n.startswith(parent + ".") else n for n in names[1:]]
    return "+".join([first, *rest])


def layer_groups(
    model: nn.Module, probe: Tensor, target: str, depth: int | None = None
) -> list[LayerGroup]:
    """The groups of ``model``'s learning modules, the one nearest the output first
    (see the module docstring); ``probe`` is one ``(1, C, H, W)`` input on the model's
    device, ``target`` the explained layer."""
    resolve_layer(model, target)  # an unknown name says so, with the close matches
    order, before_target = _forward_order(model, probe, target)
    above = {name for i, name in enumerate(order) if i >= before_target}
    # Each layer with the norms that follow it.
    units: list[list[str]] = []
    modules = dict(model.named_modules())
    for name in order:
        if units and isinstance(modules[name], _NORMS):
            units[-1].append(name)
        else:
            units.append([name])
    if depth is None:
        keyed = [(_group_name(unit), unit) for unit in units]
    else:
        keyed = [(".".join(unit[0].split(".")[:depth]), unit) for unit in units]
    grouped: dict[str, list[str]] = {}
    last: dict[str, int] = {}
    for i, (key, unit) in enumerate(keyed):
        grouped.setdefault(key, []).extend(unit)
        last[key] = i
    # Nearest the output first: by the last of their modules to run.
    keys = sorted(grouped, key=lambda k: last[k], reverse=True)
    return [
        LayerGroup(key, tuple(grouped[key]), all(n in above for n in grouped[key])) for key in keys
    ]


def _module_seed(seed: int, step: int, index: int) -> int:
    # Independent streams per (seed, step, module): seed 1 step 1 shares nothing with
    # seed 0 step 2.
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters and buffers in place (children untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(module).to("cpu")
        with torch.no_grad():
            reset = getattr(fresh, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for parameter in fresh.parameters(recurse=False):
                    flat = parameter.flatten()
                    parameter.copy_(flat[torch.randperm(flat.numel())].view_as(parameter))
    new_parameters = dict(fresh.named_parameters(recurse=False))
    new_buffers = dict(fresh.named_buffers(recurse=False))
    with torch.no_grad():
        for name, parameter in module.named_parameters(recurse=False):
            parameter.copy_(new_parameters[name])
        for name, buffer in module.named_buffers(recurse=False):
            if name in new_buffers:
                buffer.copy_(new_buffers[name])
    forget_folded(module)


def randomise(model: nn.Module, group: LayerGroup, seed: int, step: int) -> None:
    """Re-initialise every module of ``group`` in ``model`` (in place)."""
    for i, name in enumerate(group.modules):
        _reinitialise(model.get_submodule(name), _module_seed(seed, step, i))


def gradcam_explainer(layer: str, method: str, device: torch.device) -> Explainer:
    """The service's engine, as the sanity check calls it."""

    def explain(module: nn.Module, inputs: Tensor, targets: Sequence[int]) -> Tensor:
        # A GradCAM holds no state between calls: one per call costs nothing.
        batch = GradCAM(module, device)(
            inputs, layer, [[t] for t in targets], [method] * len(targets)
        )
        return torch.stack([cams[0] for cams in batch.cams])

    return explain


def _input_maps(maps: Tensor, input_size: tuple[int, int]) -> np.ndarray:
    """``(N, h, w)`` raw maps → ``(N, H, W)`` in [0, 1] at the model input."""
    height, width = input_size
    geometry = fit_geometry(width, height, input_size, "stretch")  # the input itself
    return np.stack([normalise(resample(m, geometry, "input")) for m in maps.float().cpu().numpy()])


def _constant(heat: np.ndarray) -> bool:
    return float(heat.max() - heat.min()) == 0.0


@dataclass(frozen=True)
class CascadeSettings:
    """How the cascade runs, beyond the layer it explains: the ``method``, the class
    (``target``, else each image's top-1), the ``seed`` of the re-initialisations, the
    grouping (``depth``: see ``layer_groups``) and how many images one explanation takes
    (``batch_size``)."""

    method: str = "gradcam"
    target: int | None = None
    seed: int = 0
    depth: int | None = None
    batch_size: int = BATCH_SIZE


def _targets(module: nn.Module, chunks: Sequence[Tensor], target: int | None) -> list[int]:
    """The class explained for each image: ``target``, or the ORIGINAL model's top-1."""
    if target is not None:
        return [target] * sum(len(chunk) for chunk in chunks)
    with torch.no_grad():
        return [int(t) for chunk in chunks for t in module(chunk).argmax(dim=1).tolist()]


@dataclass(frozen=True)
class _Comparison:
    """The original maps ``(N, H, W)`` and the images (``keep``, by index) whose original
    map is not constant: each step's maps are compared with these."""

    original: np.ndarray
    keep: list[int]

    def step(self, index: int, group: LayerGroup | None, heat: np.ndarray) -> Step:
        """Step ``index``, after ``group`` was randomised (None: the original model),
        whose maps are ``heat``."""
        original, keep = self.original, self.keep
        constant = tuple(_constant(heat[i]) for i in keep)
        rank = [spearman(original[i], heat[i]) for i in keep]
        return Step(
            index=index,
            layer=group.name if group else "",
            modules=group.modules if group else (),
            above_target=group.above_target if group else False,
            spearman=tuple(0.0 if c else r for r, c in zip(rank, constant, strict=True)),
            ssim=tuple(ssim(original[i], heat[i]) for i in keep),
            constant=constant,
        )


def run_sanity(
    model: LoadedModel,
    inputs: Tensor,
    names: Sequence[str],
    layer: str,
    settings: CascadeSettings | None = None,
    explainer: Explainer | None = None,
) -> SanityReport:
    """The cascade on ``inputs`` ``(N, C, H, W) float32``, normalised as the model
    expects (``batch_inputs``), one name per image, explaining ``layer`` as ``settings``
    say (the defaults of ``CascadeSettings`` if None). ``explainer`` replaces the GradCAM
    engine (the tests' negative control)."""
    settings = settings or CascadeSettings()
    if inputs.shape[0] != len(names) or not len(names):
        raise ValueError(f"{inputs.shape[0]} images and {len(names)} names")
    module = copy.deepcopy(model.module)  # the served model stays as it is
    module.eval()
    explain = explainer or gradcam_explainer(layer, settings.method, model.device)
    size = settings.batch_size
    chunks = [inputs[i : i + size].to(model.device) for i in range(0, len(names), size)]
    groups = layer_groups(module, chunks[0][:1], layer, settings.depth)
    targets = _targets(module, chunks, settings.target)

    def maps() -> np.ndarray:
        out, start = [], 0
        for chunk in chunks:
            out.append(explain(module, chunk, targets[start : start + len(chunk)]))
            start += len(chunk)
        height, width = model.input_size  # sanity runs on 2-D models
        return _input_maps(torch.cat(out), (height, width))

    original = maps()
    keep = [i for i in range(len(names)) if not _constant(original[i])]
    if not keep:
        raise NothingToCompare(
            f"every original {settings.method} map at '{layer}' is constant: nothing to compare"
        )
    comparison = _Comparison(original, keep)
    steps = [comparison.step(0, None, original)]
    for k, group in enumerate(groups, start=1):
        randomise(module, group, settings.seed, k)
        steps.append(comparison.step(k, group, maps()))
        logger.info("sanity step %d/%d: %s randomised", k, len(groups), group.name)
    return SanityReport(
        model=model.name,
        layer=layer,
        method=settings.method,
        seed=settings.seed,
        depth=settings.depth,
        images=tuple(names[i] for i in keep),
        targets=tuple(model.labels[targets[i]] for i in keep),
        skipped=tuple(names[i] for i in range(len(names)) if i not in keep),
        steps=tuple(steps),
    )
