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
    print(
        f"model '{model.name}' ({model.arch}), input {model.channels}×"
        f"{model.input_size[0]}×{model.input_size[1]}; * = default layer"
    )
    width = max(len(name) for name in [*model.layer_names(), *(r.name for r in refused)])
    for layer in model.layers:
        mark = "*" if layer.name == model.default_layer else " "
        # A transformer's layers: the grid's shape, and what it was made from.
        made_from = "" if layer.layout == "nchw" else f"  (from {_LAYOUT_WORDS[layer.layout]})"
        print(
            f"{mark} {layer.name:<{width}}  {layer.kind:<20} "
            f"{layer.channels}×{layer.height}×{layer.width}{made_from}"
        )
    if refused:
        print("not offered, and why:")
    for refusal in refused:
        print(f"- {refusal.name:<{width}}  {refusal.kind:<20} {refusal.reason}")
    return EXIT_OK
