"""Write a set of phantoms for the Grad-CAM audit: PNG images and where their findings are.

    python -m tools.demo_model.audit_set --out audit --count 200 --seed 7
    python -m tools.demo_model.audit_set --out audit-marker --count 200 --seed 7 \\
        --marker --require nodule         # every image: a nodule and the corner marker

Writes into ``--out``:

- ``phantom_0000.png`` ...: 8-bit grayscale, ``--size`` pixels square (256 by default;
  the service resizes to the model's 128×128);
- ``boxes.csv``: ``image,label,x0,y0,x1,y1``, one row per finding box, in pixels of
  the written PNG (``image`` is the file name relative to the folder, ``label`` the
  finding). The marker is not a finding and is not listed here: the boxes are
  where a model's evidence should be;
- ``labels.csv``: ``image,nodule,mass,opacity,tube``, 1 where the finding is present;
- ``markers.csv``: ``image,x0,y0,x1,y1``, the marker's box on the images that carry
  it (where ``phantom_shortcut`` looks instead).

``--marker`` (or ``--marker nodule``) plants the marker as in ``phantom_shortcut``'s
training data, on every image with a nodule and no other; ``--marker all`` on
every image. The scenes are those of the same seed without ``--marker``.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

from PIL import Image

from service.demo.phantom import FINDINGS, MarkerPolicy, iter_phantoms
from service.imaging.values import to_uint8

MarkerMode = Literal["none", "nodule", "all"]
_POLICIES: dict[MarkerMode, MarkerPolicy | None] = {
    "none": None,
    "nodule": MarkerPolicy(finding="nodule", with_finding=1.0, without_finding=0.0),
    "all": MarkerPolicy(finding="nodule", with_finding=1.0, without_finding=1.0),
}
# Not the seed of any training, validation or evaluation set (train.py, evaluate.py).
AUDIT_SEED = 7


@dataclass(frozen=True)
class AuditImage:
    """One written image: its file name, findings' boxes and marker box (pixels)."""

    name: str
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]
    marker: tuple[float, float, float, float] | None


def _round(box: tuple[float, float, float, float]) -> list[float]:
    return [round(v, 2) for v in box]


def write_audit_set(
    out: Path,
    count: int,
    seed: int = AUDIT_SEED,
    marker: MarkerMode = "none",
    size: int = 256,
    require: str | None = None,
) -> list[AuditImage]:
    """Write ``count`` phantoms and their CSV files into ``out`` (created); see the module."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[AuditImage] = []
    phantoms = iter_phantoms(seed, size, _POLICIES[marker], require)
    with (
        (out / "boxes.csv").open("w", newline="") as boxes_file,
        (out / "labels.csv").open("w", newline="") as labels_file,
        (out / "markers.csv").open("w", newline="") as markers_file,
    ):
        boxes, labels, markers = (csv.writer(f) for f in (boxes_file, labels_file, markers_file))
        boxes.writerow(["image", "label", "x0", "y0", "x1", "y1"])
        labels.writerow(["image", *FINDINGS])
        markers.writerow(["image", "x0", "y0", "x1", "y1"])
        for index, phantom in enumerate(islice(phantoms, count)):
            name = f"phantom_{index:04d}.png"
            Image.fromarray(to_uint8(phantom.image)).save(out / name)
            for finding in phantom.findings:
                boxes.writerow([name, finding.kind, *_round(finding.box)])
            labels.writerow([name, *(int(v) for v in phantom.labels)])
            if phantom.marker is not None:
                markers.writerow([name, *_round(phantom.marker)])
            written.append(
                AuditImage(name, tuple((f.kind, f.box) for f in phantom.findings), phantom.marker)
            )
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", "--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=AUDIT_SEED)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--marker",
        nargs="?",
        const="nodule",
        default="none",
        choices=list(_POLICIES),
        help="plant the corner marker: on nodule images (the default with the flag) or all",
    )
    parser.add_argument("--require", choices=FINDINGS, help="only images with this finding")
    args = parser.parse_args()
    written = write_audit_set(args.out, args.count, args.seed, args.marker, args.size, args.require)
    carrying = sum(image.marker is not None for image in written)
    print(f"wrote {len(written)} images ({carrying} with the marker) to {args.out}")


if __name__ == "__main__":
    main()
