"""Faithfulness on the demo model: Grad-CAM against a random and a centred map, with the
blurred substrate the service uses and with the dataset mean, and the price of the curves.

    python tests/benchmarks/faithfulness.py [--images 200] [--plot docs/faithfulness.png]

For each of ``--images`` phantoms that show a finding (seeded; 128×128, the model's input
size) the top-1 class is explained and the deletion and insertion curves are computed
(``engine/faithfulness.py``) for three maps at the layer's resolution: Grad-CAM's, a
uniform random map (seeded), and a centred Gaussian (σ a quarter of the side). Printed:
per substrate, how often Grad-CAM's deletion AUC is lower (insertion higher) than each
other map's, over the informative images (the substrate at least halves the class's
score; where it does not, every map's curve is flat and they tie) and per class; the
median AUCs; and the milliseconds per explanation of the curves (median of 5 runs of a
batch of 8, alternating with the plain explanation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.contract.settings import Settings
from service.demo.phantom import FINDINGS, sample_phantom
from service.engine import faithfulness
from service.engine.runtime import Runtime
from service.imaging.values import to_uint8
from service.pipeline.faithfulness import auc
from service.transport.interface import Job

MAPS = ("gradcam", "random", "centred")


def _mean_substrate(x: torch.Tensor) -> torch.Tensor:
    # The dataset mean is 0 once normalised.
    return torch.zeros_like(x)


def _centred(size: tuple[int, int]) -> torch.Tensor:
    ys = torch.arange(size[0], dtype=torch.float32) - (size[0] - 1) / 2
    xs = torch.arange(size[1], dtype=torch.float32) - (size[1] - 1) / 2
    sigma = size[0] / 4
    return torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--plot", type=Path, default=None, help="write the curves' plot here")
    parser.add_argument(
        "--steps", type=Path, default=None, help="write a mass phantom's deletion steps here"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    runtime = Runtime(Settings(device="cpu")).start()
    model = runtime.models["phantom"]
    engine = runtime._explainers["phantom"]
    pictures = []
    seed = 0
    while len(pictures) < args.images:
        picture = sample_phantom(np.random.default_rng(10_000 + seed), 128, 128)
        seed += 1
        if picture.findings:
            pictures.append(picture)
    images = [to_uint8(p.image)[:, :, None] for p in pictures]
    n = len(images)
    results = []
    for start in range(0, n, 16):
        chunk = images[start : start + 16]
        k = len(chunk)
        job = Job("phantom", "features", chunk, [None] * k, [[None]] * k, ["gradcam"] * k)
        results.append(runtime.run(job, float("inf")))
    maps = [m for r in results for m in r.maps]
    targets = [t for r in results for t in r.targets]
    scores = torch.from_numpy(np.concatenate([r.scores for r in results]))
    inputs = (
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - model.mean[0]
    ) / model.std[0]
    layer = maps[0][0].shape
    generator = torch.Generator().manual_seed(0)
    cams = {
        "gradcam": [[torch.from_numpy(m[0])] for m in maps],
        "random": [[torch.rand(layer, generator=generator)] for _ in range(n)],
        "centred": [[_centred(layer)] for _ in range(n)],
    }

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(engine.logits(x))

    curves: dict[tuple[str, str], np.ndarray] = {}
    for substrate, make in (("blur σ=5", faithfulness.gaussian_blur), ("mean", _mean_substrate)):
        for name in MAPS:
            explained = faithfulness.Explanations(inputs, scores, cams[name], targets, [True] * n)
            per_image = faithfulness.curves(probabilities, explained, substrate_of=make)
            curves[substrate, name] = np.stack([c[0] for c in per_image])
    classes = np.array([FINDINGS[t[0]] for t in targets])
    print(
        f"{n} phantoms with a finding, top-1 class explained:",
        ", ".join(f"{k} {int(np.sum(classes == k))}" for k in FINDINGS),
    )
    for substrate in ("blur σ=5", "mean"):
        ours = curves[substrate, "gradcam"]
        informative = ours[:, 0, -1] <= ours[:, 0, 0] / 2
        print(
            f"\nsubstrate {substrate}: {informative.sum()} of {n} informative",
            "(the substrate at least halves the score)",
        )
        aucs = {
            name: np.array([[auc(d), auc(i)] for d, i in curves[substrate, name]]) for name in MAPS
        }
        print("  map       deletion AUC median  insertion AUC median")
        for name in MAPS:
            a = aucs[name][informative]
            print(f"  {name:<9} {np.median(a[:, 0]):>19.3f}  {np.median(a[:, 1]):>20.3f}")
        for other in ("random", "centred"):
            g, o = aucs["gradcam"][informative], aucs[other][informative]
            deletion, insertion = np.mean(g[:, 0] < o[:, 0]), np.mean(g[:, 1] > o[:, 1])
            line = (
                f"  Grad-CAM vs {other:<7}: deletion lower {deletion:.1%}, "
                f"insertion higher {insertion:.1%}"
            )
            per_class = []
            for kind in FINDINGS:
                rows = informative & (classes == kind)
                if rows.any():
                    gc, oc = aucs["gradcam"][rows], aucs[other][rows]
                    per_class.append(
                        f"{kind} {np.mean(gc[:, 0] < oc[:, 0]):.0%}/"
                        f"{np.mean(gc[:, 1] > oc[:, 1]):.0%} (n={rows.sum()})"
                    )
            print(line + "; by class (deletion/insertion): " + ", ".join(per_class))

    # The price: curves for a batch of 8 against the plain explanation, alternating.
    batch = images[:8]
    plain = Job("phantom", "features", batch, [None] * 8, [[None]] * 8, ["gradcam"] * 8)
    with_curves = Job(
        "phantom", "features", batch, [None] * 8, [[None]] * 8, ["gradcam"] * 8, [True] * 8
    )
    timings: dict[str, list[float]] = {"plain": [], "faithfulness": []}
    for _ in range(5):
        for name, job in (("plain", plain), ("faithfulness", with_curves)):
            started = time.perf_counter()
            runtime.run(job, float("inf"))
            timings[name].append((time.perf_counter() - started) * 1000 / 8)
    plain_ms, curves_ms = (float(np.median(timings[k])) for k in ("plain", "faithfulness"))
    print(
        f"\nms per image (batch of 8, median of 5): plain {plain_ms:.1f}, "
        f"with faithfulness {curves_ms:.1f} (+{curves_ms - plain_ms:.1f})"
    )
    if args.plot is not None:
        _plot(curves, args.plot)
    if args.steps is not None:
        first_mass = int(np.flatnonzero(classes == "mass")[0])
        _steps(
            inputs[first_mass : first_mass + 1],
            cams["gradcam"][first_mass][0],
            curves["blur σ=5", "gradcam"][first_mass, 0],
            (model.mean[0], model.std[0]),
            args.steps,
        )
    runtime.close()


def _plot(curves: dict[tuple[str, str], np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fraction = np.linspace(0, 1, faithfulness.STEPS + 1)
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    colours = {"gradcam": "tab:red", "random": "tab:gray", "centred": "tab:blue"}
    for column, (substrate, kind) in enumerate(
        [(s, k) for s in ("mean", "blur σ=5") for k in ("deletion", "insertion")]
    ):
        ax = axes[column]
        for name in MAPS:
            values = curves[substrate, name][:, 0 if kind == "deletion" else 1]
            ax.plot(fraction, np.median(values, axis=0), color=colours[name], label=name)
            ax.fill_between(
                fraction, *np.percentile(values, [25, 75], axis=0), color=colours[name], alpha=0.12
            )
        ax.set_title(f"{kind}, substrate: {substrate}")
        ax.set_xlabel(
            "fraction of pixels replaced" if kind == "deletion" else "fraction of pixels put back"
        )
    axes[0].set_ylabel("score of the explained class\n(median, 25-75 %)")
    axes[0].legend(loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"wrote {path}")


def _steps(
    x: torch.Tensor,
    cam: torch.Tensor,
    deletion: np.ndarray,
    normalisation: tuple[float, float],
    path: Path,
) -> None:
    """The deletion of one image, step by step, with the score the model gave each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = normalisation
    masks = faithfulness.step_masks(cam, (x.shape[2], x.shape[3]))
    substrate = faithfulness.gaussian_blur(x)
    shown = (0, 1, 2, 3, 4, 6)
    figure, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 3.1))
    for ax, k in zip(axes, shown, strict=True):
        image = torch.where(masks[k], substrate, x)[0, 0] * std + mean
        ax.imshow(image.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{k * 5} % deleted\nscore {deletion[k]:.2f}", fontsize=10)
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
