"""Engine cost against a plain forward pass and against pytorch-grad-cam.

    python tests/benchmarks/engine.py [--archs resnet50 densenet121] [--batches 1 8 32]
                                      [--repeats 5] [--threads 2] [--size 224]

For each model and batch size, each repetition runs, back to back and in a
rotating order: a plain forward under ``torch.inference_mode()``, our engine
(``gradcam``, top-1 targets, maps copied to the CPU), and pytorch-grad-cam's
``GradCAM`` (top-1 targets). Prints median seconds and the median of the
per-repetition ratios to the plain forward. Random-init weights (seeded): the
cost does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from pytorch_grad_cam import GradCAM as ReferenceGradCAM

from service.engine.gradcam import GradCAM
from service.engine.layers import default_layer, probe_layers, resolve_layer


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench(arch: str, batches: list[int], repeats: int, size: int) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval().requires_grad_(False)
    layer = default_layer(probe_layers(model, 3, (size, size)), model)
    assert layer is not None
    # pytorch-grad-cam needs parameters that require grad; give it its own copy.
    reference_model = copy.deepcopy(model).requires_grad_(True)
    reference = ReferenceGradCAM(model=reference_model,
                                 target_layers=[resolve_layer(reference_model, layer)])
    engine = GradCAM(model)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size)

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        def ours(x: torch.Tensor = x, n: int = batch) -> None:
            engine(x, layer, [[None]] * n, ["gradcam"] * n)

        def theirs(x: torch.Tensor = x) -> None:
            reference(x, None)

        runners = {"forward": forward, "ours": ours, "pytorch-grad-cam": theirs}
        for fn in runners.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(repeats):
            names = list(runners)
            names = names[r % 3:] + names[:r % 3]
            for name in names:
                times[name].append(_timed(runners[name]))
        ratio_ours = statistics.median(o / f for o, f in zip(times["ours"], times["forward"],
                                                             strict=True))
        ratio_ref = statistics.median(o / f for o, f in zip(times["pytorch-grad-cam"],
                                                            times["forward"], strict=True))
        med = {name: statistics.median(values) * 1000 for name, values in times.items()}
        rows.append(f"| {arch} | {layer} | {batch} | {med['forward']:.0f} | {med['ours']:.0f} | "
                    f"{med['pytorch-grad-cam']:.0f} | **{ratio_ours:.2f}×** | {ratio_ref:.2f}× |")
        print(rows[-1], flush=True)
    reference.activations_and_grads.release()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}², "
          f"median of {args.repeats} paired repetitions (ms)")
    print("| model | layer | batch | forward | ours | pytorch-grad-cam | ours / forward | "
          "pytorch-grad-cam / forward |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        bench(arch, args.batches, args.repeats, args.size)


if __name__ == "__main__":
    main()
