"""``gradcam-service layers``: a model's candidate target layers and their map shapes, then
the layers that cannot be explained, each with the reason."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from service.cli import common
from service.cli.common import EXIT_OK, EXIT_USAGE, Subparsers
from service.contract.errors import ServiceError

if TYPE_CHECKING:  # torch is imported only once the model runs here
    from service.engine.layers import RefusedLayer
    from service.engine.runtime import Runtime
    from service.transport.interface import LayerInfo, ModelInfo

# Layouts a map is made from rather than read as it is (a volume's NCDHW is read as it is).
_LAYOUT_WORDS = {"nhwc": "H×W×C", "tokens": "tokens"}


def add_parser(sub: Subparsers) -> None:
    parser = common.add_command(
        sub,
        "layers",
        "list the layers of a model that can be explained, with their map shapes",
        ["gradcam-service layers", "gradcam-service layers --models models.toml --model resnet50"],
        "One line per layer (its name for --layer, its type, the shape of its map for one "
        "image); * marks the default. Then the layers that cannot be explained, and why.",
    )
    common.add_model_options(parser)


def _refused(runtime: Runtime, name: str) -> list[RefusedLayer]:
    """The model's layers that cannot be explained: one more probe of the loaded module
    (the catalogue lists the candidates only)."""
    from service.engine.layers import survey_layers

    loaded = runtime.models[name]
    return survey_layers(loaded.module, loaded.channels, loaded.input_size).refused


def input_shape(model: ModelInfo) -> str:
    """The model's input for one image, ``C×H×W``, or a volume model's ``C×D×H×W``."""
    return "×".join(str(side) for side in (model.channels, *model.input_size))


def layer_shape(layer: LayerInfo) -> str:
    """A layer's map for one input, ``C×H×W`` (a volume's ``C×D×H×W``), and for a
    transformer's layer what the grid was made from."""
    shape = "×".join(str(side) for side in (layer.channels, *layer.grid))
    made_from = _LAYOUT_WORDS.get(layer.layout)
    return f"{shape}  (from {made_from})" if made_from else shape


def run(args: argparse.Namespace) -> int:
    common.model_name(args)  # an unknown --model costs no model load
    runtime = common.runtime(args)
    try:
        model = runtime.catalog().get(args.model)
        refused = _refused(runtime, model.name)
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        runtime.close()
    print(f"model '{model.name}' ({model.arch}), input {input_shape(model)}; * = default layer")
    width = max(len(name) for name in [*model.layer_names(), *(r.name for r in refused)])
    for layer in model.layers:
        mark = "*" if layer.name == model.default_layer else " "
        print(f"{mark} {layer.name:<{width}}  {layer.kind:<20} {layer_shape(layer)}")
    if refused:
        print("not offered, and why:")
    for refusal in refused:
        print(f"- {refusal.name:<{width}}  {refusal.kind:<20} {refusal.reason}")
    return EXIT_OK
