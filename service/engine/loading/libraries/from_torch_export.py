"""``library = "torch.export"``: a model exported with ``torch.export.export`` and saved
with ``torch.export.save``; ``arch`` is the ``.pt2`` file, relative to the models file.

Why it can be explained: ``torch.export.unflatten`` gives the exported graph back its
module hierarchy, each submodule under its original name (``layer4``, ``features.7``)
running its part of the graph; forward hooks fire on those, gradients flow through the
graph, and the maps are the eager model's to float rounding (the tests compare them).
Each submodule is listed under its original type's name (``Conv2d``, ``BasicBlock``).

What the archive fixes, checked at load, each refusal one line that says what to export
instead:

- its graph: no operator in training mode (batch norm from the batch's own statistics,
  dropout): an archive cannot be put in eval mode, its graph is what was exported.
  (That it calls torch's operators and nothing else the file could name, torch's own
  verifier checks when ``torch.export.load`` reads it);
- its files: no pickled objects (``torch.export.load`` would unpickle them, which runs
  code from the file; plain tensors are stored raw) and no AOTInductor-compiled code
  (native code, with no layers to hook);
- its input: one ``(N, C, H, W)`` tensor whose batch dimension is dynamic and
  unbounded (the service runs batches of any size from 1); a fixed channel count,
  height and width are the input's defaults (``sources``: the exported program), and a
  models file that sets others is told so;
- its layers: "auto" and the default layer know a transformer by its Python types,
  which an archive does not keep, so an archive with attention modules declares its
  ``layout`` and names its ``layer``.

Preprocessing (mean, std, resize) cannot come from an archive: the models file's values
or the defaults apply. Devices written into the graph (a tensor made in ``forward``)
follow the model to its device (``place``).
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.passes import move_to_device_pass
from torch.export.pt2_archive import constants as pt2
from torch.export.unflatten import InterpreterModule
from torch.utils._sympy.numbers import int_oo

from service.contract.checkpoint_format import not_an_export_archive
from service.contract.models_file import ModelsFile, ModelSpec
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.libraries import Built
from service.engine.loading.preprocessing import LibraryConfig

SOURCE = "the exported program's input"
_TRAINING_ARGUMENTS = ("training", "train")
_SMALLEST_LOWER = 2  # torch.export's own lower bound for a dynamic size (1 still runs)


def build(name: str, spec: ModelSpec, num_classes: int | None, models: ModelsFile) -> Built:
    path = models.resolve_path(spec.arch)
    _check_file(name, path)
    program = _load(name, path)
    _check_eval_mode(name, path, program)
    shape = _input_shape(name, path, program)
    values = _input_values(name, spec, path, program, shape)
    module = torch.export.unflatten(program)
    _name_kinds(module)
    _check_layout(name, spec, path, module)
    return Built(module, LibraryConfig(SOURCE, values), weights_loaded=True, place=place)


def _check_file(name: str, path: Path) -> None:
    """A torch.export archive whose files hold nothing that runs code when read."""
    if not path.is_file():
        raise ModelConfigError(name, "arch", f"file {path} does not exist")
    problem = not_an_export_archive(path)
    if problem is not None:
        raise ModelConfigError(name, "arch", problem)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0]
        if any(n.startswith(f"{root}/{pt2.AOTINDUCTOR_DIR}") for n in names):
            raise ModelConfigError(
                name,
                "arch",
                f"{path} holds AOTInductor-compiled code (aoti_compile_and_package): compiled "
                "code has no layers to hook and is native code the service does not run. Save "
                "the ExportedProgram itself: torch.export.save(program, path)",
            )
        if f"{root}/{pt2.MODELS_FILENAME_FORMAT.format('model')}" not in names:
            raise ModelConfigError(
                name,
                "arch",
                f"{path} holds no program named 'model' (torch.export.save writes one)",
            )
        pickled = _pickled_entries(archive, root, names)
    if pickled:
        raise ModelConfigError(
            name,
            "arch",
            f"{path} holds pickled objects ({', '.join(pickled[:3])}), which the service does "
            "not unpickle (that could run code from the file): export a model whose weights, "
            "buffers and example inputs are plain tensors",
        )


def _pickled_entries(archive: zipfile.ZipFile, root: str, names: list[str]) -> list[str]:
    """What ``torch.export.load`` would unpickle: tensors stored with pickle (tensor
    subclasses), custom and opaque objects, and example inputs that are not tensors."""
    found = []
    for config_file, kind in (
        (pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, "weight"),
        (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, "constant"),
    ):
        entry = f"{root}/{config_file.format('model')}"
        if entry not in names:
            continue
        config = json.loads(archive.read(entry)).get("config", {})
        for key, payload in config.items():
            if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(
                (pt2.WEIGHT_FILENAME_PREFIX, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
            ):
                found.append(f"{kind} {key}")
    inputs = f"{root}/{pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format('model')}"
    if inputs in names:
        try:
            torch.load(io.BytesIO(archive.read(inputs)), weights_only=True)
        except Exception:  # torch.export.load would retry with weights_only=False
            found.append("its example inputs")
    return found


def _load(name: str, path: Path) -> ExportedProgram:
    try:
        with path.open("rb") as handle:
            program = torch.export.load(handle)
    except Exception as error:  # a damaged entry, an archive of another torch version
        raise ModelConfigError(
            name,
            "arch",
            f"cannot read {path} with torch {torch.__version__}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}",
        ) from None
    return move_to_device_pass(program, "cpu")


def _graphs(program: ExportedProgram) -> list[torch.fx.Graph]:
    return [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]


def _training_argument(node: torch.fx.Node) -> str | None:
    """The name of ``node``'s training flag if the operator runs with it true."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.name not in _TRAINING_ARGUMENTS:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if value is True:
            return argument.name
    return None


def _check_eval_mode(name: str, path: Path, program: ExportedProgram) -> None:
    for graph in _graphs(program):
        for node in graph.nodes:
            flag = _training_argument(node)
            if flag is not None:
                raise ModelConfigError(
                    name,
                    "arch",
                    f"{path} was exported in training mode: {node.target} runs with {flag}=True "
                    "(batch norm from each batch's own statistics, dropout at random), and an "
                    "archive's graph cannot be put in eval mode. Export model.eval()",
                )


def _input_shape(name: str, path: Path, program: ExportedProgram) -> tuple[Any, ...]:
    """The shape of the one ``(N, C, H, W)`` input (ints, or SymInts where dynamic), its
    batch dimension checked: dynamic, from 1 to any size."""
    inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    value = placeholders[inputs[0]].meta.get("val") if len(inputs) == 1 else None
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        shown = tuple(value.shape) if isinstance(value, torch.Tensor) else f"{len(inputs)} inputs"
        raise ModelConfigError(
            name,
            "arch",
            f"{path} takes {shown}; the service calls a model with one image batch (N, C, H, W)",
        )
    shape = tuple(value.shape)
    batch = shape[0]
    bounds = (batch, batch)
    if isinstance(batch, torch.SymInt):
        found = program.range_constraints.get(batch.node.expr)
        bounds = (found.lower, found.upper) if found is not None else (0, int_oo)
    if bounds[0] > _SMALLEST_LOWER or bounds[1] != int_oo:
        lower, upper = bounds
        fixed = (
            f"a fixed batch of {batch}"
            if lower == upper
            else f"batches of {lower} or more"
            if upper == int_oo
            else f"batches of {lower} to {upper}"
        )
        raise ModelConfigError(
            name,
            "arch",
            f"{path} was exported for {fixed} images; the service runs batches of any size "
            "from 1. Export with a dynamic batch: torch.export.export(model, (x,), "
            f'dynamic_shapes={{"{inputs[0]}": {{0: torch.export.Dim("batch")}}}}) '
            "(no min or max)",
        )
    return shape


def _input_values(
    name: str, spec: ModelSpec, path: Path, program: ExportedProgram, shape: tuple[Any, ...]
) -> dict[str, Any]:
    """Channels and input size: the input's fixed dimensions, else the example input's
    (``torch.export.save`` keeps it); a models file that sets other fixed ones is told."""
    shown = "×".join(str(d) if isinstance(d, int) else "NCHW"[i] for i, d in enumerate(shape))
    for key, dims, given in (
        ("channels", shape[1:2], (spec.channels,)),
        ("input_size", shape[2:], tuple(spec.input_size)),
    ):
        fixed = [(d, g) for d, g in zip(dims, given, strict=True) if isinstance(d, int)]
        if spec.given(key) and any(d != g for d, g in fixed):
            raise ModelConfigError(
                name,
                key,
                f"{path} takes {shown} inputs, fixed when it was exported: leave {key} out, "
                "or export with that dimension dynamic (torch.export.Dim)",
            )
    example = program.example_inputs[0][0] if program.example_inputs else None
    sizes: list[int | None] = [d if isinstance(d, int) else None for d in shape]
    if isinstance(example, torch.Tensor) and example.dim() == 4:
        sizes = [d if d is not None else int(example.shape[i]) for i, d in enumerate(sizes)]
    values: dict[str, Any] = {}
    if sizes[1] is not None:
        values["channels"] = sizes[1]
    if sizes[2] is not None and sizes[3] is not None:
        values["input_size"] = (sizes[2], sizes[3])
    return values


@functools.cache
def _kind(type_name: str) -> type[InterpreterModule]:
    """An ``InterpreterModule`` class named after the module type it was exported from."""
    return type(type_name, (InterpreterModule,), {"__module__": __name__})


def _name_kinds(module: nn.Module) -> None:
    """Each submodule under its original type's name (``Conv2d``, not ``InterpreterModule``),
    as the layers list shows it and the default layer's choice reads it."""
    for sub in module.modules():
        original = getattr(sub, "_ty", None)
        if type(sub) is InterpreterModule and isinstance(original, str):
            sub.__class__ = _kind(original.rsplit(".", 1)[-1])


def _check_layout(name: str, spec: ModelSpec, path: Path, module: nn.Module) -> None:
    """A transformer in an archive declares its layout and names its layer: "auto" and
    the default layer know one by its Python types, which an archive does not keep."""
    attention = next(
        (n for n, m in module.named_modules() if type(m).__name__.endswith("Attention")), None
    )
    if attention is None:
        return
    where = f"{path} holds attention modules ('{attention}'), whose layers are known by "
    if spec.layout == "auto":
        raise ModelConfigError(
            name,
            "layout",
            f"{where}their Python types, which an archive does not keep: declare the layout "
            '("tokens" with prefix_tokens for a ViT, "nhwc" for a Swin, "nchw" for a CNN) '
            "and name the layer (docs/models.md)",
        )
    if spec.layer is None:
        raise ModelConfigError(
            name,
            "layer",
            f"{where}their Python types, which an archive does not keep: name the layer, as "
            "the model's named_modules() names it (a ViT's: the first LayerNorm of its last "
            "block, the input of its last attention; docs/models.md)",
        )


def place(module: nn.Module, device: torch.device) -> None:
    """Devices written into ``module``'s graphs (a tensor made in ``forward`` is exported
    with the device it was made on) → ``device``, after the module moved there."""
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            # torch.device, or a string where move_to_device_pass wrote one
            if isinstance(node.kwargs.get("device"), torch.device | str):
                node.kwargs = {**node.kwargs, "device": device}
            if node.target is torch.ops.aten.to.device:
                node.args = (node.args[0], device, *node.args[2:])
