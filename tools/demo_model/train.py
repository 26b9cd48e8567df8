"""Train the demo model on generated phantoms and write its weights.

    python -m tools.demo_model.train              # ~10 minutes on 2 CPU cores
    python -m tools.demo_model.train --shortcut   # the deliberately wrong one, ~4 minutes

Reproduces ``service/demo/phantom_net.safetensors`` (seeded data, seeded
initialisation; float results can differ in the last bits between machines).
Then ``python -m tools.demo_model.evaluate --write-card`` refreshes the model card.

``--shortcut`` trains ``phantom_shortcut`` (``service/demo/phantom_shortcut.safetensors``),
the same network on phantoms whose corner marker stands in for the nodule: every
image with a nodule carries it, no other does (MODEL_CARD.md, "phantom_shortcut").
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

from service.demo.evaluation import mean_auc
from service.demo.model import phantom_net
from service.demo.phantom import FINDINGS, MarkerPolicy, Phantom, make_dataset
from service.imaging.geometry import to_model_pixels
from service.imaging.values import to_uint8

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[2] / "service" / "demo"
WEIGHTS_PATH = DEMO_DIR / "phantom_net.safetensors"
SHORTCUT_WEIGHTS_PATH = DEMO_DIR / "phantom_shortcut.safetensors"
INPUT_SIZE = 128
# Normalisation shared by training and the models file (mean/std of the phantoms).
MEAN = 0.37
STD = 0.21
TRAIN_SEED = 0
VALIDATION_SEED = 1
# The shortcut model's recipe: the marker on every nodule image and on no other.
# A perfect correlation is enough: the nodules keep their usual contrast, and the
# model still learns the marker alone (MODEL_CARD.md has the figures).
SHORTCUT_MARKER = MarkerPolicy(finding="nodule", with_finding=1.0, without_finding=0.0)
# Its phantoms are rendered at 256×256 and reach the network as a served image does
# (8-bit PNG levels, the service's resize to 128×128). Trained on direct 128×128
# renders instead, it learned the marker's exact pixels there: served 256×256 images
# (the audit's) got a mean nodule score of 0.86 with the marker, 128×128 ones 0.999.
SHORTCUT_RENDER_SIZE = 256
SHORTCUT_VALIDATION_COUNT = 500


def _served(phantom: Phantom) -> np.ndarray:
    """``(128, 128) float32`` in [0, 1]: the model input the service makes of the phantom."""
    png = Image.fromarray(to_uint8(phantom.image))
    pixels, _, _ = to_model_pixels(png, (INPUT_SIZE, INPUT_SIZE), "stretch")
    return pixels[..., 0].astype(np.float32) / 255


def _to_tensors(phantoms: list[Phantom], served: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([_served(p) if served else p.image for p in phantoms])
    labels = torch.from_numpy(np.stack([p.labels for p in phantoms]))
    return (torch.from_numpy(images)[:, None] - MEAN) / STD, labels


def train(
    train_count: int, epochs: int, batch_size: int, out: Path, shortcut: bool = False
) -> None:
    torch.manual_seed(TRAIN_SEED)
    started = time.monotonic()
    marker = SHORTCUT_MARKER if shortcut else None
    size = SHORTCUT_RENDER_SIZE if shortcut else INPUT_SIZE
    val_count = SHORTCUT_VALIDATION_COUNT if shortcut else 1000
    train_x, train_y = _to_tensors(
        make_dataset(train_count, TRAIN_SEED, size, marker), served=shortcut
    )
    val_x, val_y = _to_tensors(make_dataset(val_count, VALIDATION_SEED, size, marker), shortcut)
    bare_x = None
    if shortcut:
        # The shortcut's tell: the same validation scenes without the marker.
        bare_x = _to_tensors(make_dataset(val_count, VALIDATION_SEED, size), served=True)[0]
    logger.info(
        "generated %d + %d phantoms in %.0f s", len(train_x), len(val_x), time.monotonic() - started
    )

    model = phantom_net(num_classes=len(FINDINGS))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = train_x[idx]
            # Horizontal flips: the scene is left/right symmetric, labels unchanged.
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(model(x), train_y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.inference_mode():
            scores = torch.cat([model(val_x[i : i + 256]) for i in range(0, len(val_x), 256)])
            bare = None
            if bare_x is not None:
                bare = torch.cat([model(bare_x[i : i + 256]) for i in range(0, len(bare_x), 256)])
        auc = mean_auc(scores.numpy(), val_y.numpy())
        logger.info(
            "epoch %d/%d: loss %.4f, validation mean AUC %.4f, %.0f s",
            epoch + 1,
            epochs,
            total / len(train_x),
            auc,
            time.monotonic() - started,
        )
        if bare is not None:
            nodule = FINDINGS.index("nodule")
            positive = val_y[:, nodule] > 0.5
            logger.info(
                "  nodule probability on nodule images: %.3f with the marker, %.3f without",
                float(torch.sigmoid(scores[positive, nodule]).mean()),
                float(torch.sigmoid(bare[positive, nodule]).mean()),
            )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out))
    logger.info(
        "wrote %s (%.1f kB) after %.0f s", out, out.stat().st_size / 1e3, time.monotonic() - started
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: 8,000 phantoms × 8 epochs; with --shortcut 3,000 × 3 (it learns the
    # marker within the first epoch; the rest is for the other three findings).
    parser.add_argument("--train-count", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shortcut", action="store_true", help="train phantom_shortcut (marker-correlated data)"
    )
    parser.add_argument(
        "--out", type=Path, help="weights file; default: the model's, in service/demo"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.shortcut:
        out, count, epochs = SHORTCUT_WEIGHTS_PATH, 3000, 3
    else:
        out, count, epochs = WEIGHTS_PATH, 8000, 8
    train(
        args.train_count or count,
        args.epochs or epochs,
        args.batch_size,
        args.out or out,
        args.shortcut,
    )


if __name__ == "__main__":
    main()
