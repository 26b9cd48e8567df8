"""Train the 3-D demo model (``nodule3d``) on generated CT phantom volumes and write its weights.

    python -m tools.demo_model.train_volume                 # train, save, evaluate (1 thread)
    python -m tools.demo_model.train_volume --evaluate      # the figures of the saved weights
    python -m tools.demo_model.train_volume --examples examples/volumes   # example NIfTI files

Reproduces ``service/demo/nodule_net_3d.safetensors`` (seeded phantoms, seeded
initialisation; float results can differ in the last bits between machines).
Phantoms are generated on the fly (``service.demo.volume_phantom``, 96×96×64 voxels
of 3.5 × 3.5 × 5 mm) and brought to the model by MONAI's standard pipeline, the one
the models file describes (``window = [-1000, 400]``, ``input_size = [64, 64, 64]``):
``ScaleIntensityRange(-1000, 400 → 0, 1, clip)`` then ``Resize((64, 64, 64))``
(mode "area").

The evaluation reports accuracy on fresh phantoms and a 3-D pointing game: on
phantoms with exactly one nodule, MONAI's ``GradCAM`` at ``features`` for class
``nodule``; a hit when the map's peak voxel lies in the nodule's box grown by one
voxel, on the model's 64³ input grid (the map as MONAI upsamples it) and on the
volume's own 96×96×64 grid (the raw map upsampled there, as the service will).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRange
from monai.visualize import GradCAM
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from service.demo.volume_model import NoduleNet3d, nodule_net_3d
from service.demo.volume_phantom import (
    VOLUME_LABELS,
    Nodule,
    VolumePhantom,
    iter_volume_phantoms,
)

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[2] / "service" / "demo"
WEIGHTS_PATH = DEMO_DIR / "nodule_net_3d.safetensors"
# What the models file says (volumes.toml): the window in HU and the model's input grid.
WINDOW = (-1000.0, 400.0)
INPUT_SIZE = (64, 64, 64)
LAYER = "features"
MAP_STRIDE = 2  # the score map's cell, in input voxels (NoduleNet3d's features)
# The weight of the nodule score map's own loss (see _losses).
MAP_LOSS_WEIGHT = 1.0
NODULE = VOLUME_LABELS.index("nodule")
TRAIN_SEED = 0
ACCURACY_SEED = 2026
POINTING_SEED = 2027
ACCURACY_COUNT = 200
POINTING_COUNT = 100
# (file name, seed, voxels, spacing in mm, nodules): the example volumes, each the first
# phantom of its seed with that many nodules. Their grid is not the training one (the same
# field of view, 336 × 336 × 320 mm, in 80×80×56 voxels), so that they stay about 200 kB
# (noise does not compress: 96×96×64 is 330 kB). The single nodule is seed 9's, the first
# seed from 2 whose nodule is solid and large enough to see at once (≥ 5 mm, ≥ -300 HU):
# seed 2's is a faint ground-glass one (-649 HU) the model misses (p = 0.40).
EXAMPLES = (
    ("phantom_ct_nodule", 9, (80, 80, 56), (4.2, 4.2, 320 / 56), 1),
    ("phantom_ct_two_nodules", 3, (80, 80, 56), (4.2, 4.2, 320 / 56), 2),
    ("phantom_ct_no_nodule", 4, (80, 80, 56), (4.2, 4.2, 320 / 56), 0),
)

PREPROCESS = Compose(
    [
        ScaleIntensityRange(
            a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
        ),
        Resize(spatial_size=INPUT_SIZE),
    ]
)


def preprocess(voxels: np.ndarray) -> torch.Tensor:
    """``(I, J, K)`` HU → ``(1, 64, 64, 64) float32``: the model's input for one volume."""
    out = PREPROCESS(voxels[None])
    return torch.as_tensor(np.asarray(out, dtype=np.float32))


def _batch(phantoms: list[VolumePhantom]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([preprocess(p.voxels) for p in phantoms])
    y = torch.tensor([p.label for p in phantoms])
    return x, y


def nodule_target(phantom: VolumePhantom, stride: int = MAP_STRIDE) -> torch.Tensor:
    """``(D, H, W) float32`` on the score map's grid (the input grid / ``stride``): for
    each cell, exp(-d² / 2σ²) of its centre's distance d to the nearest nodule centre,
    σ = max(radius, 5 mm); zeros without a nodule."""
    cells = tuple(size // stride for size in INPUT_SIZE)
    spacing = np.asarray(phantom.spacing_on_grid(INPUT_SIZE)) * stride
    # Cell c spans input voxels stride·c ... stride·c + stride - 1: its centre in mm from
    # the grid's edge is (c + 0.5) · stride · step.
    axes = [(np.arange(n) + 0.5) * step for n, step in zip(cells, spacing, strict=True)]
    target = np.zeros(cells)
    for nodule in phantom.nodules_on_grid(INPUT_SIZE):
        centre = (np.asarray(nodule.centre_voxel) + 0.5) * spacing / stride
        d2 = sum(
            ((axis - c) ** 2).reshape([-1 if a == b else 1 for b in range(3)])
            for a, (axis, c) in enumerate(zip(axes, centre, strict=True))
        )
        sigma = max(nodule.radius_mm, 5.0)
        target = np.maximum(target, np.exp(-d2 / (2 * sigma**2)))
    return torch.from_numpy(target.astype(np.float32))


def _batches(seed: int, batch_size: int) -> Iterator[list[VolumePhantom]]:
    phantoms = iter_volume_phantoms(seed)
    while True:
        yield [next(phantoms) for _ in range(batch_size)]


def _losses(
    model: NoduleNet3d, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits, and the loss: cross-entropy on the labels plus, on the volumes with a
    nodule, a cross-entropy over the cells of the nodule score map (its softmax, at the
    head's sharpness, against ``target`` normalised to sum to 1): "the nodule is here".

    With the labels alone the model did not learn in 1,600 phantoms (loss 0.69 throughout,
    with log-sum-exp or average pooling): a nodule is a few of 32,768 cells, and a few
    minutes of one CPU thread see too few phantoms to find them from a yes or no per
    volume. A per-cell binary cross-entropy against ``target`` did not either (it first
    learns that most cells are no nodule); the cross-entropy over cells points the map at
    the nodule within tens of steps."""
    scores = model.score_map(x)
    logits = model.pool(scores)
    loss = F.cross_entropy(logits, y)
    positive = y == NODULE
    if positive.any():
        where = target[positive].flatten(1)
        where = where / where.sum(1, keepdim=True)
        cells = F.log_softmax(model.sharpness * scores[positive, NODULE].flatten(1), dim=1)
        loss = loss - MAP_LOSS_WEIGHT * (where * cells).sum(1).mean()
    return logits, loss


def train(steps: int, batch_size: int, learning_rate: float, out: Path) -> NoduleNet3d:
    torch.manual_seed(TRAIN_SEED)
    started = time.monotonic()
    model = nodule_net_3d(num_classes=len(VOLUME_LABELS))
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=learning_rate, total_steps=steps, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    model.train()
    loss_sum, right, seen = 0.0, 0, 0
    for step, phantoms in enumerate(_batches(TRAIN_SEED, batch_size), start=1):
        x, y = _batch(phantoms)
        target = torch.stack([nodule_target(p) for p in phantoms])
        # Left-right flips (along i): the scene is symmetric enough, the label unchanged.
        flip = torch.rand(len(y), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None, None], x.flip(2), x)
        target = torch.where(flip[:, None, None, None], target.flip(1), target)
        logits, loss = _losses(model, x, y, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_sum += float(loss.detach()) * len(y)
        right += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if step % 20 == 0 or step == steps:
            logger.info(
                "step %d/%d: loss %.4f, training accuracy %.3f, %.0f s",
                step,
                steps,
                loss_sum / seen,
                right / seen,
                time.monotonic() - started,
            )
            loss_sum, right, seen = 0.0, 0, 0
        if step == steps:
            break
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out))
    logger.info(
        "wrote %s (%.1f kB) after %.0f s", out, out.stat().st_size / 1e3, time.monotonic() - started
    )
    return model.eval()


def load_model(path: Path = WEIGHTS_PATH) -> NoduleNet3d:
    model = nodule_net_3d(num_classes=len(VOLUME_LABELS))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def accuracy(model: NoduleNet3d, phantoms: Iterator[VolumePhantom], batch_size: int = 8) -> float:
    """Share of ``phantoms`` whose most likely class is their label."""
    right = total = 0
    while chunk := [p for _, p in zip(range(batch_size), phantoms, strict=False)]:
        x, y = _batch(chunk)
        with torch.inference_mode():
            right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def _hit(peak: tuple[int, ...], nodule: Nodule, spacing: tuple[float, float, float]) -> bool:
    low, high = nodule.box(spacing, pad=1)
    return all(lo <= p <= hi for p, lo, hi in zip(peak, low, high, strict=True))


def _unchanged(cam_map: torch.Tensor) -> torch.Tensor:
    return cam_map


def _peak(cam_map: torch.Tensor) -> tuple[int, ...]:
    """The voxel index of the largest value of a ``(1, 1, I, J, K)`` map."""
    index = np.unravel_index(int(cam_map.flatten().argmax()), cam_map.shape[2:])
    return tuple(int(i) for i in index)


@dataclass(frozen=True)
class Pointing:
    """Pointing game hits on the model's input grid and on the volume's own grid."""

    count: int
    input_hits: int
    native_hits: int
    distances_mm: tuple[float, ...]  # peak (input grid) to nodule centre


def pointing_game(model: NoduleNet3d, phantoms: Iterator[VolumePhantom]) -> Pointing:
    """Grad-CAM (MONAI) for ``nodule`` on single-nodule phantoms; see the module's docstring."""
    # MONAI's default post-processing maps (min, max) to (1, 0), for its colour maps: its
    # peak would be the map's minimum. Keep the upsampled map as it is.
    cam = GradCAM(nn_module=model, target_layers=LAYER, postprocessing=_unchanged)
    count = input_hits = native_hits = 0
    distances = []
    for phantom in phantoms:
        (nodule,) = phantom.nodules
        x = preprocess(phantom.voxels)[None]
        on_input = _peak(cam(x, class_idx=NODULE))
        (on_grid,) = phantom.nodules_on_grid(INPUT_SIZE)
        spacing = phantom.spacing_on_grid(INPUT_SIZE)
        input_hits += _hit(on_input, on_grid, spacing)
        raw = cam.compute_map(x, class_idx=NODULE)
        native = F.interpolate(raw, size=phantom.shape, mode="trilinear", align_corners=False)
        native_hits += _hit(_peak(native), nodule, phantom.spacing)
        offset = (np.asarray(on_input) - np.asarray(on_grid.centre_voxel)) * np.asarray(spacing)
        distances.append(float(np.linalg.norm(offset)))
        count += 1
    model.zero_grad(set_to_none=True)  # MONAI's GradCAM backpropagates into the weights
    return Pointing(count, input_hits, native_hits, tuple(distances))


def evaluate(model: NoduleNet3d) -> None:
    started = time.monotonic()
    acc = accuracy(model, iter_volume_phantoms(ACCURACY_SEED, ACCURACY_COUNT))
    logger.info(
        "accuracy on %d fresh phantoms (seed %d): %.3f",
        ACCURACY_COUNT,
        ACCURACY_SEED,
        acc,
    )
    _, _, shape, spacing, _ = EXAMPLES[0]
    phantoms = iter_volume_phantoms(ACCURACY_SEED, ACCURACY_COUNT, shape=shape, spacing=spacing)
    logger.info("  on the examples' grid %s: %.3f", shape, accuracy(model, phantoms))
    result = pointing_game(
        model, iter_volume_phantoms(POINTING_SEED, POINTING_COUNT, nodule_count=1)
    )
    logger.info(
        "pointing game on %d single-nodule phantoms (seed %d): %d/%d = %.3f on the 64³ input grid, "
        "%d/%d = %.3f on the volume's own grid; peak to nodule centre: median %.1f mm, max %.1f mm",
        result.count,
        POINTING_SEED,
        result.input_hits,
        result.count,
        result.input_hits / result.count,
        result.native_hits,
        result.count,
        result.native_hits / result.count,
        float(np.median(result.distances_mm)),
        max(result.distances_mm),
    )
    logger.info("evaluated in %.0f s", time.monotonic() - started)


def write_examples(out: Path) -> None:
    """The example volumes (``EXAMPLES``) as int16 NIfTI in HU with their affines, and
    ``nodules.json``: each one's grid and nodules (centre, radius, voxel box)."""
    import nibabel as nib  # the "volumes" extra: needed only here

    out.mkdir(parents=True, exist_ok=True)
    described = {}
    for name, seed, shape, spacing, count in EXAMPLES:
        phantom = next(iter_volume_phantoms(seed, shape=shape, spacing=spacing, nodule_count=count))
        voxels = np.round(phantom.voxels).astype(np.int16)
        image = nib.Nifti1Image(voxels, phantom.affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, out / f"{name}.nii.gz")
        described[f"{name}.nii.gz"] = {
            "shape": list(shape),
            "spacing_mm": [round(s, 4) for s in spacing],
            "nodules": [
                {
                    "centre_mm": [round(c, 1) for c in n.centre_mm],
                    "centre_voxel": [round(c, 2) for c in n.centre_voxel],
                    "radius_mm": round(n.radius_mm, 2),
                    "hu": round(n.hu),
                    "box": [list(corner) for corner in n.box(spacing)],
                }
                for n in phantom.nodules
            ],
        }
    (out / "nodules.json").write_text(json.dumps(described, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="the weights file")
    parser.add_argument("--evaluate", action="store_true", help="evaluate --out, no training")
    parser.add_argument("--examples", type=Path, help="write the example volumes there, only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.examples is not None:
        write_examples(args.examples)
        return
    if args.evaluate:
        model = load_model(args.out)
    else:
        model = train(args.steps, args.batch_size, args.learning_rate, args.out)
    evaluate(model)


if __name__ == "__main__":
    main()
