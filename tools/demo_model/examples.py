"""Write the example images of the repository (``examples/``) from the phantom generator.

    python -m tools.demo_model.examples [--out examples]

Each image comes with its findings and boxes in ``findings.json``, and
``request.json`` is a ready ``POST /v1/explain`` body for the first one.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from service.demo.phantom import sample_phantom, to_uint8

# (name, seed, width, height): square ones like the training data, and odd
# non-square sizes to show that heatmaps follow any pixel grid.
EXAMPLES = (
    ("phantom_nodule", 2, 384, 384),
    ("phantom_mass_tube", 3, 384, 384),
    ("phantom_opacity", 7, 512, 400),
    ("phantom_four_findings", 37, 448, 448),
    ("phantom_odd_size", 25, 517, 389),
)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_examples(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    findings = {}
    for name, seed, width, height in EXAMPLES:
        phantom = sample_phantom(np.random.default_rng(seed), width, height)
        (out / f"{name}.png").write_bytes(_png(phantom.image))
        findings[f"{name}.png"] = {
            "width": width, "height": height,
            "findings": [{"kind": f.kind, "box": [round(v, 1) for v in f.box]}
                         for f in phantom.findings],
        }
    (out / "findings.json").write_text(json.dumps(findings, indent=2) + "\n")
    first = (out / f"{EXAMPLES[0][0]}.png").read_bytes()
    request = {"images": [base64.b64encode(first).decode("ascii")], "top_k": 4,
               "heatmap": {"format": "overlay", "size": "original"}}
    (out / "request.json").write_text(json.dumps(request) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"))
    write_examples(parser.parse_args().out)


if __name__ == "__main__":
    main()
