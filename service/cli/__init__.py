"""``gradcam-service``: serve the HTTP API, explain images, list layers.

    gradcam-service serve [--port P] [--workers N]   the HTTP API on gunicorn
    gradcam-service explain IMAGE... [--out DIR]     overlay + heatmap PNGs per image (+ SR)
    gradcam-service explain --request BODY.json      the exact JSON the HTTP API returns
    gradcam-service layers                           candidate target layers and shapes
    gradcam-service body IMAGE... [--target T]       a POST /v1/explain body, for curl & co.
    gradcam-service sanity --images DIR [--out DIR]  the maps after cascading randomisation
    gradcam-service audit --images DIR --out DIR     where the model looks over a dataset

One module per command (``add_parser`` and ``run``), ``main.py`` parses and dispatches,
``common.py`` holds what they share. Exit codes (``common.EXIT_*``): 0 done; 1 some
inputs (or the request) got an error, each told on one line, the others done; 2 bad
usage, settings or models file, nothing done; 3 an output file exists (``--force``
overwrites); 70 an internal failure (one line; ``-v`` adds the traceback); 130
interrupted.
"""

from service.cli.common import (
    EXIT_EXISTS,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)
from service.cli.main import main

__all__ = [
    "EXIT_EXISTS",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]
