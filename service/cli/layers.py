"""``gradcam-service layers``: a model's candidate target layers and their map shapes."""

from __future__ import annotations

import argparse
import sys

from service.cli import common
from service.cli.common import EXIT_OK, EXIT_USAGE, Subparsers
from service.contract.errors import ServiceError

_LAYOUT_WORDS = {"nhwc": "H×W×C", "tokens": "tokens"}


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser("layers", help="list candidate target layers with output shapes")
    common.add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    runtime = common.runtime(args)
    try:
        model = runtime.catalog().get(args.model)
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        runtime.close()
    print(
        f"model '{model.name}' ({model.arch}), input {model.channels}×"
        f"{model.input_size[0]}×{model.input_size[1]}; * = default layer"
    )
    width = max(len(layer.name) for layer in model.layers)
    for layer in model.layers:
        mark = "*" if layer.name == model.default_layer else " "
        # A transformer's layers: the grid's shape, and what it was made from.
        made_from = "" if layer.layout == "nchw" else f"  (from {_LAYOUT_WORDS[layer.layout]})"
        print(
            f"{mark} {layer.name:<{width}}  {layer.kind:<20} "
            f"{layer.channels}×{layer.height}×{layer.width}{made_from}"
        )
    return EXIT_OK
