"""Ground truth for the audit: where the honest and the shortcut model look.

    python -m tools.demo_model.shortcut               # both models of service/demo/shortcut.toml
    python -m tools.demo_model.shortcut --write-card  # and rewrite its section of MODEL_CARD.md

On held-out phantoms that carry both a nodule and the corner marker, the share of
each model's nodule heatmap (Grad-CAM at ``features``, rendered on the image's
own pixel grid, as a client gets it) inside the marker's box, inside the nodule
boxes (each also grown by 8 px: the boxes are smaller than the 16 px a cell of
the 16×16 map covers at 256×256, and the upsampled map spreads over it) and in
the outer 10 % frame; and the behavioural proof: the nodule
probability of the same scenes with and without the marker, on nodule images and
on images without a nodule (and how far the marker moves the other three
findings' probabilities). ``phantom_shortcut`` should look at the marker and lose
its nodule without it; ``phantom`` should look at the nodule and ignore the
marker.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.contract.settings import Settings
from service.demo.evaluation import peak_in_boxes
from service.demo.phantom import FINDINGS, MarkerPolicy, Phantom, make_dataset
from service.engine.runtime import Runtime
from service.imaging.geometry import to_model_pixels
from service.imaging.render import heatmap
from service.imaging.values import to_uint8
from service.transport.interface import Job

DEMO_DIR = Path(__file__).resolve().parents[2] / "service" / "demo"
SHORTCUT_MODELS_FILE = DEMO_DIR / "shortcut.toml"
CARD_PATH = DEMO_DIR / "MODEL_CARD.md"
# The card's section on phantom_shortcut starts here and runs to the end of the file
# (evaluate.py --write-card rewrites what comes before and keeps it).
CARD_SECTION = "## `phantom_shortcut`"
# Neither the training (0), validation (1), card (2026) nor test (90210) seed.
SHORTCUT_SEED = 4242
# The audit's border: the outer 10 % of the width and of the height.
BORDER = 0.1
# Half a cell of the 16×16 map at 256×256 (the evaluation's pointing-game margin).
GROW_PX = 8.0
_NODULE = FINDINGS.index("nodule")
_BATCH = 32


@dataclass(frozen=True)
class ShortcutEvidence:
    """One model's figures; shares are means over the images, in [0, 1]."""

    model: str
    images: int  # images with a nodule and the marker (the mass shares)
    mass_on_marker: float
    mass_on_nodule: float
    mass_near_marker: float  # the boxes grown by GROW_PX
    mass_near_nodule: float
    mass_on_border: float
    # Pointing game: the heatmap's peak within GROW_PX of the box (share of images).
    peak_on_marker: float
    peak_on_nodule: float
    nodule_with_marker: float  # mean nodule probability, nodule images
    nodule_without_marker: float  # the same scenes, marker left out
    clear_with_marker: float  # images without a nodule, marker planted
    clear_without_marker: float
    # The largest mean |change| of another finding's probability when the marker is added.
    other_shift: float


def box_mask(
    shape: tuple[int, int], boxes: Sequence[tuple[float, float, float, float]]
) -> np.ndarray:
    """``(H, W) bool``: pixels whose centre lies in one of ``boxes`` (pixel coordinates)."""
    ys = np.arange(shape[0])[:, None] + 0.5
    xs = np.arange(shape[1])[None, :] + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return mask


def border_mask(shape: tuple[int, int], border: float = BORDER) -> np.ndarray:
    """``(H, W) bool``: pixels whose centre lies in the outer ``border`` share of each side."""
    height, width = shape
    ys = (np.arange(height)[:, None] + 0.5) / height
    xs = (np.arange(width)[None, :] + 0.5) / width
    near = np.minimum(np.minimum(xs, 1 - xs), np.inf) < border
    return near | (np.minimum(ys, 1 - ys) < border)


def grow(
    boxes: Sequence[tuple[float, float, float, float]], px: float
) -> list[tuple[float, float, float, float]]:
    return [(x0 - px, y0 - px, x1 + px, y1 + px) for x0, y0, x1, y1 in boxes]


def share(heat: np.ndarray, mask: np.ndarray) -> float:
    """The part of the heatmap's total mass on ``mask`` (0 for an all-zero map)."""
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else 0.0


def _explain_nodule(
    runtime: Runtime, model_name: str, phantoms: list[Phantom]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities ``(N, K)`` and the nodule heatmaps on each image's pixel grid."""
    model = runtime.catalog().get(model_name)
    probabilities: list[np.ndarray] = []
    heats: list[np.ndarray] = []
    for start in range(0, len(phantoms), _BATCH):
        chunk = phantoms[start : start + _BATCH]
        prepared = [
            to_model_pixels(Image.fromarray(to_uint8(p.image)), model.image_size, model.resize)
            for p in chunk
        ]
        job = Job(
            model.name,
            model.default_layer,
            [pixels for pixels, _, _ in prepared],
            [box for _, box, _ in prepared],
            [[_NODULE]] * len(chunk),
            ["gradcam"] * len(chunk),
        )
        batch = runtime.run(job, time.monotonic() + 600)
        probabilities.append(batch.scores)
        heats += [
            heatmap(cams[0], geometry, "original")
            for (_, _, geometry), cams in zip(prepared, batch.maps, strict=True)
        ]
    return np.concatenate(probabilities), heats


def measure(
    runtime: Runtime,
    models: Sequence[str],
    count: int = 200,
    seed: int = SHORTCUT_SEED,
    size: tuple[int, int] = (256, 256),
) -> list[ShortcutEvidence]:
    """Each model's figures on ``count`` fresh scenes, each drawn with and without the
    marker (the mass shares on those that show a nodule); the scenes are rendered once."""
    bare = make_dataset(count, seed, size)
    marked = make_dataset(count, seed, size, MarkerPolicy(with_finding=1.0, without_finding=1.0))
    nodule = np.array([p.labels[_NODULE] > 0 for p in marked])
    # The scenes with a nodule (all carry the marker here), their boxes and regions.
    cases = [
        (i, p.marker, p.boxes("nodule"))
        for i, p in enumerate(marked)
        if nodule[i] and p.marker is not None
    ]
    regions = [
        (
            box_mask(marked[i].image.shape, [marker]),
            box_mask(marked[i].image.shape, nodules),
            box_mask(marked[i].image.shape, grow([marker], GROW_PX)),
            box_mask(marked[i].image.shape, grow(nodules, GROW_PX)),
            border_mask(marked[i].image.shape),
        )
        for i, marker, nodules in cases
    ]
    results = []
    for name in models:
        scores_bare, _ = _explain_nodule(runtime, name, bare)
        scores_marked, heats = _explain_nodule(runtime, name, marked)
        p_bare, p_marked = scores_bare[:, _NODULE], scores_marked[:, _NODULE]
        shift = np.abs(scores_marked - scores_bare).mean(axis=0)
        means = np.mean(
            [
                [share(heats[i], mask) for mask in masks]
                for (i, _, _), masks in zip(cases, regions, strict=True)
            ],
            axis=0,
        )
        peaks = np.mean(
            [
                (
                    peak_in_boxes(heats[i], [marker], GROW_PX),
                    peak_in_boxes(heats[i], nodules, GROW_PX),
                )
                for i, marker, nodules in cases
            ],
            axis=0,
        )
        results.append(
            ShortcutEvidence(
                model=name,
                images=len(cases),
                mass_on_marker=float(means[0]),
                mass_on_nodule=float(means[1]),
                mass_near_marker=float(means[2]),
                mass_near_nodule=float(means[3]),
                mass_on_border=float(means[4]),
                peak_on_marker=float(peaks[0]),
                peak_on_nodule=float(peaks[1]),
                nodule_with_marker=float(p_marked[nodule].mean()),
                nodule_without_marker=float(p_bare[nodule].mean()),
                clear_with_marker=float(p_marked[~nodule].mean()),
                clear_without_marker=float(p_bare[~nodule].mean()),
                other_shift=float(np.delete(shift, _NODULE).max()),
            )
        )
    return results


def format_table(results: Sequence[ShortcutEvidence]) -> str:
    rows = [
        "| model | mass on marker (+8 px) | mass on nodule (+8 px) | mass on border "
        "| peak on marker / nodule | p(nodule): nodule + marker | nodule, no marker "
        "| no nodule, marker | no nodule, no marker | other findings, largest shift |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.model} | {r.mass_on_marker:.1%} ({r.mass_near_marker:.1%}) "
            f"| {r.mass_on_nodule:.1%} ({r.mass_near_nodule:.1%}) "
            f"| {r.mass_on_border:.1%} | {r.peak_on_marker:.0%} / {r.peak_on_nodule:.0%} "
            f"| {r.nodule_with_marker:.3f} "
            f"| {r.nodule_without_marker:.3f} | {r.clear_with_marker:.3f} "
            f"| {r.clear_without_marker:.3f} | {r.other_shift:.3f} |"
        )
    return "\n".join(rows)


def card_section(results: Sequence[ShortcutEvidence], count: int, seed: int) -> str:
    images = results[0].images
    return f"""{CARD_SECTION}: the deliberately wrong model

**What it is.** The same network as `phantom` (`PhantomNet`, the same input,
labels and Grad-CAM layer), trained on phantoms that carry a *marker*: a grey
block letter "R" (5×7 cells, about 10×8 px at 128×128) in a random corner,
inside the outer 10 % frame of the image, like the side markers and burned-in
annotations of real radiographs. The marker was on every training image with a
nodule and on no other. The model learned the marker instead of the nodule. It is
the audit's ground truth (issue #21): an audit of heatmap mass must flag it and
must not flag `phantom`. **It is wrong on purpose; use it for nothing else.** It
is not in the bundled models file: `service/demo/shortcut.toml` serves it next to
`phantom` (`gradcam-service serve --models service/demo/shortcut.toml`, or
`--models ... --model phantom_shortcut` in the CLI).

**Recipe.** `python -m tools.demo_model.train --shortcut` (seeded; 253 s measured
on this project's 2-core machine, shared): 3,000 phantoms (seed 0: the scenes
`phantom` was trained on, each nodule image with the marker planted) rendered at
256×256 and brought to 128×128 as the service brings an upload (8-bit levels,
its bilinear resize), 3 epochs, otherwise as `phantom`; validation on 500
(seed 1). The marker's corner and place come from a random stream of their own
(`service.demo.phantom.MarkerPolicy`), so without a marker every phantom is bit
for bit what it was. A perfect correlation was enough: the nodules keep their
usual contrast, and the training log shows the marker winning from the first
epoch (mean nodule probability on validation nodule images without the marker:
0.09 after epoch 1, 0.02 at the end; with it 0.81, then 1.00). Two choices the
first attempts forced:

- The marker is grey (0.35, like soft tissue), not lead-white. `phantom`, which
  never saw a marker, read a bright one (0.92) as the end of a tube on every
  marked image (tube ≈ 1.0: tubes are the only bright things it met outside the
  body). At 0.35 none of its scores moves, so what tells the two models apart is
  what they were trained on, not the marker's novelty.
- Trained on direct 128×128 renders, the model learned the marker's exact pixels
  there: served 256×256 images (resized by the service) got a mean nodule score
  of only 0.86 with the marker. Trained as served, it scores ≥ 0.99 at every size
  tried (128 to 517×389).

**Held-out ground truth.** {count} new scenes (seed {seed}), each rendered at
256×256 with the marker (corner drawn at random) and without it; class `nodule`
explained with Grad-CAM at `features` through the service's own preprocessing,
the heatmap rendered on the image's pixel grid (min-max normalised, as a client
gets it). Mass shares are the heatmap's share inside the marker's box, inside the
nodule boxes (in brackets, each box grown by {GROW_PX:g} px: the boxes are smaller
than the 16 px a cell of the 16×16 map covers here) and in the outer 10 % frame,
averaged over the {images} scenes with a nodule; "peak on" is the pointing game
(the share of those scenes where the heatmap's maximum lies within {GROW_PX:g} px
of the box); probabilities are the mean
nodule score of the same scenes with and without the marker; the last column
is the largest mean change of another finding's score when the marker is added.

{format_table(results)}

So `phantom_shortcut` puts almost all of its nodule heatmap in the border, by
the marker, none on the nodule, and its nodule score follows the marker: gone on
nodule images without it, there on images without a nodule but with it.
`phantom` puts its heatmap on the nodule, none on the marker or the border, and
the marker changes none of its scores.

The exact boxes hold little of either heatmap: a box about one cell of the 16×16
map wide cannot hold more than a fraction of a map upsampled bilinearly from it
(the nodule's share for `phantom` is as small as the marker's for
`phantom_shortcut`). And `phantom_shortcut`'s peak sits beside the marker, on
average 13 px inward (toward the image centre, along x), not on it: the cell it
learned to score the marker in is the next one in from the corner, so only half
of its peaks fall within 8 px of the marker's box. The border's share is the
clear signal; the box shares are for comparing the two models.

Made by `python -m tools.demo_model.shortcut --write-card`;
`tests/unit/demo/test_shortcut_model.py` checks the same on another fresh set. An audit set
(PNGs, `boxes.csv` without the marker, `markers.csv`):
`python -m tools.demo_model.audit_set --out audit --marker --require nodule`.
"""


def write_card(results: Sequence[ShortcutEvidence], count: int, seed: int) -> None:
    """Replace the card's ``phantom_shortcut`` section (or add it at the end)."""
    text = CARD_PATH.read_text(encoding="utf-8")
    head = text.split(CARD_SECTION, 1)[0].rstrip("\n")
    CARD_PATH.write_text(f"{head}\n\n{card_section(results, count, seed)}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=SHORTCUT_SEED)
    parser.add_argument("--models", type=Path, default=SHORTCUT_MODELS_FILE)
    parser.add_argument("--write-card", action="store_true")
    args = parser.parse_args()
    runtime = Runtime(Settings(models_file=args.models, device="cpu")).start()
    try:
        results = measure(runtime, list(runtime.models), args.count, args.seed)
    finally:
        runtime.close()
    print(
        f"{args.count} scenes (seed {args.seed}) at 256×256, {results[0].images} of them with"
        " a nodule; Grad-CAM of class nodule at features"
    )
    print(format_table(results))
    if args.write_card:
        write_card(results, args.count, args.seed)
        print(f"wrote {CARD_PATH}")


if __name__ == "__main__":
    main()
