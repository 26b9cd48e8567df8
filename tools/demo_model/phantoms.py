"""Write phantoms as PNG files, for the commands that take a folder of images.

    python -m tools.demo_model.phantoms [--count 32] [--seed 2026] [--size 128] --out DIR

The default seed is the evaluation set's (``evaluate.py``: never used in training),
so ``gradcam-service sanity --images DIR`` runs on images the demo model never saw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from service.demo.phantom import make_dataset
from service.imaging.values import to_uint8
from tools.demo_model.evaluate import EVALUATION_SEED


def write_phantoms(out: Path, count: int, seed: int = EVALUATION_SEED, size: int = 128) -> None:
    """``out/phantom_000.png`` … one 8-bit grey PNG per phantom of ``make_dataset``."""
    out.mkdir(parents=True, exist_ok=True)
    for i, phantom in enumerate(make_dataset(count, seed, size)):
        Image.fromarray(to_uint8(phantom.image)).save(out / f"phantom_{i:03d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write_phantoms(args.out, args.count, args.seed, args.size)


if __name__ == "__main__":
    main()
