"""GPU memory that CUDA graphs hold: one model's graphs at every batch bucket.

    python tests/benchmarks/graph_memory.py [--arch resnet50] [--max-batch-size 32]

Each captured graph keeps its static buffers and a private memory pool
(``engine/cuda_graphs.py``). Captures the default layer's ``gradcam`` graph of a
folded, random-init model at each bucket up to ``--max-batch-size`` (as
``GRADCAM_CUDA_GRAPHS=on`` does at warm-up) and prints the memory reserved by
PyTorch's allocator after each capture, against the model alone.
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from service.engine.buckets import bucket_sizes
from service.engine.cuda_graphs import GraphCache
from service.engine.folding import fold_batch_norms
from service.engine.gradcam import GradCAM
from service.engine.layers import default_layer, probe_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True  # as the engine process sets it
    model = torchvision.models.get_model(args.arch, weights=None).eval().requires_grad_(False)
    layer = default_layer(probe_layers(model, 3, (args.size, args.size)), model)
    assert layer is not None
    fold_batch_norms(model)
    model.cuda()
    engine, cache = GradCAM(model, "cuda"), GraphCache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    print(f"{args.arch}, layer {layer}, {args.size}²: model alone {base / 2**20:.0f} MiB reserved")
    for batch in bucket_sizes(args.max_batch_size):
        x = torch.randn(batch, 3, args.size, args.size, device="cuda")
        given = torch.full((batch,), -1, dtype=torch.long, device="cuda")
        assert cache.run((args.arch, layer, "gradcam", batch), engine, x, given) is not None
        torch.cuda.synchronize()
        held = torch.cuda.memory_reserved() - base
        print(f"  graphs up to batch {batch:3d}: {held / 2**20:7.0f} MiB more reserved")


if __name__ == "__main__":
    main()
