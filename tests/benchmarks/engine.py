"""Engine cost against a plain forward pass and against pytorch-grad-cam.

    python tests/benchmarks/engine.py [--archs resnet50 densenet121] [--batches 1 8 32]
                                      [--repeats 5] [--threads 2] [--size 224]
                                      [--device cuda] [--no-reference]

    python tests/benchmarks/engine.py --archs timm:convnext_tiny \
        timm:vit_small_patch16_224 hf:vit --batches 8 --no-reference

    python tests/benchmarks/engine.py --archs monai3d:densenet121 --size 96 --batches 1 4

An arch is a torchvision name, ``timm:<name>`` (timm.create_model), ``hf:vit`` (a
Hugging Face ViT-Base image classifier from its default config) or
``monai3d:densenet121`` (MONAI's 3-D DenseNet-121, one channel, two classes: a CT
classifier's shape, on ``--size``³ volumes); library models are loaded as the service
loads them (``load_model`` of a models file: their logits, their layout, their default
layer).

For each model and batch size, each repetition runs, back to back and in a
rotating order: a plain forward under ``torch.inference_mode()``, our engine
(``gradcam``, top-1 targets, maps copied to the CPU), the same on a copy whose batch
norms are folded into its convolutions (as the service runs a float32 model), and
pytorch-grad-cam's
``GradCAM`` (top-1 targets), and on CUDA the folded engine replayed as a captured CUDA
graph (``engine/cuda_graphs.py``; inputs copied in, logits and maps copied out).
Prints median seconds and the median of the per-repetition ratios to the plain
forward. Random-init weights (seeded): the cost does not depend on the weights'
values. On CUDA every timing ends with a synchronize; ``--no-reference`` skips
pytorch-grad-cam (where it is not installed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from service.engine.cuda_graphs import CapturedCam, CudaGraph, ExplainedLayer, InputBuffer
from service.engine.folding import fold_batch_norms
from service.engine.gradcam import GradCAM
from service.engine.layers import default_layer, probe_layers, resolve_layer


def _timed(fn: Callable[[], object], device: str) -> float:
    started = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _library_model(arch: str, size: int) -> tuple[torch.nn.Module, str]:
    """A timm, Hugging Face or MONAI model as the service loads it, and its default
    layer."""
    from service.contract.models_file import load_models_file
    from service.engine.loading.models import load_model

    folder = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    library, _, name = arch.partition(":")
    if library == "hf":
        import transformers

        transformers.ViTForImageClassification(transformers.ViTConfig()).save_pretrained(
            folder / "hf"
        )
        table = 'library = "transformers"\narch = "hf"\n'
    elif library == "monai3d":
        table = (
            'library = "monai"\narch = "DenseNet121"\n'
            "arch_args = { spatial_dims = 3, in_channels = 1, out_channels = 2 }\n"
            f"input_size = [{size}, {size}, {size}]\n"
        )
    else:
        table = f'library = "timm"\narch = "{name}"\n'
    if library != "monai3d":
        table += f"input_size = [{size}, {size}]\n"
    (folder / "models.toml").write_text(f"[models.m]\n{table}")
    loaded = load_model("m", load_models_file(folder / "models.toml"))
    return loaded.module, loaded.default_layer


def bench(
    arch: str, batches: list[int], repeats: int, size: int, device: str, with_reference: bool
) -> list[str]:
    torch.manual_seed(0)
    volume = arch.startswith("monai3d:")
    if ":" in arch:
        model, layer = _library_model(arch, size)
        # pytorch-grad-cam needs a reshape of its own per token model; a 3-D CNN's
        # (N, C, D, H, W) maps it reads as they are.
        with_reference = with_reference and volume
    else:
        model = torchvision.models.get_model(arch, weights=None).eval().requires_grad_(False)
        found = default_layer(probe_layers(model, 3, (size, size)), model)
        assert found is not None
        layer = found
    reference = None
    if with_reference:
        from pytorch_grad_cam import GradCAM as ReferenceGradCAM

        # pytorch-grad-cam needs parameters that require grad; give it its own copy.
        reference_model = copy.deepcopy(model).requires_grad_(True).to(device)
        reference = ReferenceGradCAM(
            model=reference_model, target_layers=[resolve_layer(reference_model, layer)]
        )
    model.to(device)
    engine = GradCAM(model, device)
    folded_model = copy.deepcopy(model)
    fold_batch_norms(folded_model)  # as the service loads an fp32 model
    folded = GradCAM(folded_model, device)
    rows = []
    for batch in batches:
        shape = (1, size, size, size) if volume else (3, size, size)
        x = torch.randn(batch, *shape, device=device)

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        def ours(x: torch.Tensor = x, n: int = batch) -> None:
            engine(x, layer, [[None]] * n, ["gradcam"] * n)

        def ours_folded(x: torch.Tensor = x, n: int = batch) -> None:
            folded(x, layer, [[None]] * n, ["gradcam"] * n)

        runners: dict[str, Callable[[], None]] = {
            "forward": forward,
            "ours": ours,
            "ours folded": ours_folded,
        }
        if device == "cuda":
            captured = CapturedCam(
                ExplainedLayer(folded_model, layer, "gradcam"),
                InputBuffer(batch, shape, torch.device(device)),
                CudaGraph(torch.device(device)),
            )
            top1 = torch.full((batch,), -1, dtype=torch.long, device=device)

            def graphed(
                x: torch.Tensor = x, cam: CapturedCam = captured, given: torch.Tensor = top1
            ) -> None:
                logits, maps = cam(x, given)
                logits.cpu(), maps.cpu()

            runners["ours, CUDA graph"] = graphed
        if reference is not None:
            runners["pytorch-grad-cam"] = lambda x=x: reference(x, None)
        for fn in runners.values():  # warm-up (and cuDNN's algorithm search)
            for _ in range(3 if device == "cuda" else 1):
                _timed(fn, device)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(repeats):
            names = list(runners)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                times[name].append(_timed(runners[name], device))
        med = {name: statistics.median(values) * 1000 for name, values in times.items()}
        ratios = {
            name: statistics.median(o / f for o, f in zip(values, times["forward"], strict=True))
            for name, values in times.items()
        }
        theirs = (
            f"{med['pytorch-grad-cam']:.1f} | {ratios['pytorch-grad-cam']:.2f}×"
            if reference is not None
            else "– | –"
        )
        graph = (
            f" {med['ours, CUDA graph']:.1f} | **{ratios['ours, CUDA graph']:.2f}×** |"
            if device == "cuda"
            else ""
        )
        rows.append(
            f"| {arch} | {layer} | {batch} | {med['forward']:.1f} | {med['ours']:.1f} | "
            f"{ratios['ours']:.2f}× | {med['ours folded']:.1f} | "
            f"**{ratios['ours folded']:.2f}×** | {theirs} |{graph}"
        )
        print(rows[-1], flush=True)
    if reference is not None:
        reference.activations_and_grads.release()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip pytorch-grad-cam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine process sets it
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    print(
        f"torch {torch.__version__}, {where}, {args.size}², "
        f"median of {args.repeats} paired repetitions (ms)"
    )
    graph = " ours, CUDA graph | graph / forward |" if args.device == "cuda" else ""
    print(
        "| model | layer | batch | forward | ours | ours / forward | ours, batch norm folded | "
        f"folded / forward | pytorch-grad-cam | pytorch-grad-cam / forward |{graph}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if graph else ""))
    for arch in args.archs:
        bench(arch, args.batches, args.repeats, args.size, args.device, not args.no_reference)


if __name__ == "__main__":
    main()
