"""The Open Inference Protocol door against /v1, and its binary tensors against JSON.

    python tests/benchmarks/protocol.py [--pairs 3] [--duration 15] [--concurrency 16]
                                        [--torch-threads 2] [--repeats 15]

One run, on 127.0.0.1, with the real server (``gradcam-service serve``):

1. **JSON vs binary heatmaps**: resnet50 (seeded weights: maps with values everywhere,
   as real images give, not the demo model's mostly-zero maps), one JPEG of 224² and one
   of 1024², ``heatmap_size: original`` (a float map of the image's size), asked through
   ``tritonclient.http`` with the outputs as JSON and as binary data, alternately,
   ``--repeats`` times each; the median time of ``infer`` + ``as_numpy`` on the client
   and the bytes of the answer.
2. **/v2 vs /v1 under load**: the same server, on a 224² JPEG, the headline
   request (``{format: array, size: layer}``, ``top_k`` 5) through ``POST /v1/explain``
   and the same through ``/v2/models/resnet50/infer`` (image base64 in the JSON,
   ``probabilities`` and ``heatmap`` back as binary data, ``heatmap_size: layer``),
   ``--concurrency`` closed-loop clients, alternating windows of ``--duration`` s on the
   same server; req/s per window and the paired median ratio v2 / v1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
import torchvision
import tritonclient.http as triton
from load import _closed_loop, _jpeg, _start
from serving import descendants, free_port, stop


def _serve(models: Path, torch_threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--models", str(models)]
    server = _start(command, {"GRADCAM_TORCH_THREADS": str(torch_threads)}, url, "/readyz")
    return server, url


def _wire(url: str, repeats: int) -> None:
    print("| heatmap | outputs as | answer bytes | client ms (median) |")
    print("|---|---|---|---|")
    with triton.InferenceServerClient(url.removeprefix("http://")) as client:
        for side in (224, 1024):
            image = base64.b64decode(_jpeg(side))
            sent = triton.InferInput("image", [1], "BYTES")
            sent.set_data_from_numpy(np.array([image], dtype=np.object_))
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats):
                for binary in (False, True):
                    wanted = [triton.InferRequestedOutput("heatmap", binary_data=binary)]
                    started = time.perf_counter()
                    result = client.infer(
                        "resnet50", [sent], outputs=wanted, parameters={"heatmap_size": "original"}
                    )
                    heat = result.as_numpy("heatmap")
                    times[binary].append(time.perf_counter() - started)
                    assert heat.shape == (1, side, side), heat.shape
            for binary in (False, True):
                body = {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": [base64.b64encode(image).decode()],
                        }
                    ],
                    "parameters": {"heatmap_size": "original"},
                    "outputs": [{"name": "heatmap", "parameters": {"binary_data": binary}}],
                }
                size = len(requests.post(f"{url}/v2/models/resnet50/infer", json=body).content)
                print(
                    f"| {side}² FP32 | {'binary' if binary else 'JSON'} | {size:,} | "
                    f"{statistics.median(times[binary]) * 1000:.1f} |"
                )


def _cpu_seconds(root: int) -> float:
    """User + system CPU seconds of serve's live processes (a throughput ratio on a noisy
    2-core machine moves by ±5 %; the CPU each request costs moves far less)."""
    total = 0.0
    for pid in descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _doors(server_pid: int, url: str, args: argparse.Namespace) -> None:
    image = _jpeg(224)
    v1 = json.dumps(
        {"images": [image], "top_k": 5, "heatmap": {"format": "array", "size": "layer"}}
    ).encode()
    v2 = json.dumps(
        {
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}],
            "parameters": {"heatmap_size": "layer", "top_k": 5},
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "heatmap", "parameters": {"binary_data": True}},
            ],
        }
    ).encode()
    for _ in range(2):  # warm-up
        requests.post(f"{url}/v1/explain", data=v1, headers={"Content-Type": "application/json"})
    rates: dict[str, list[float]] = {"v1": [], "v2": []}
    costs: dict[str, list[float]] = {"v1": [], "v2": []}
    for pair in range(args.pairs):
        order = ("v1", "v2") if pair % 2 == 0 else ("v2", "v1")
        for door in order:
            target, body = (
                (f"{url}/v1/explain", v1)
                if door == "v1"
                else (f"{url}/v2/models/resnet50/infer", v2)
            )
            cpu_before = _cpu_seconds(server_pid)
            rate, p50, p99, refused = _closed_loop(
                target, body, args.concurrency, args.duration, warmup_s=0
            )
            # All of the window's CPU over the requests completed in it.
            cpu = (_cpu_seconds(server_pid) - cpu_before) / max(1.0, rate * args.duration)
            rates[door].append(rate)
            costs[door].append(cpu)
            print(
                f"  {door}: {rate:.1f} req/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
                f"503s {refused:.0%}, server CPU {cpu * 1000:.1f} ms per request",
                flush=True,
            )
    ratios = [b / a for a, b in zip(rates["v1"], rates["v2"], strict=True)]
    cpu = [b / a for a, b in zip(costs["v1"], costs["v2"], strict=True)]
    print(
        f"resnet50, 224² JPEG, array/layer, concurrency {args.concurrency}: /v1 "
        f"{', '.join(f'{r:.1f}' for r in rates['v1'])} req/s, /v2 "
        f"{', '.join(f'{r:.1f}' for r in rates['v2'])} req/s; v2 / v1 paired median "
        f"**{statistics.median(ratios):.2f}×**; server CPU per request v2 / v1, paired "
        f"median **{statistics.median(cpu):.3f}×**"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, engine {args.torch_threads} threads")

    folder = Path(tempfile.mkdtemp(prefix="gradcam-protocol-"))
    torch.manual_seed(0)
    weights = folder / "resnet50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    models = folder / "models.toml"
    models.write_text(f'[models.resnet50]\narch = "resnet50"\nweights = "{weights}"\n')
    server, url = _serve(models, args.torch_threads)
    try:
        _wire(url, args.repeats)
        _doors(server.pid, url, args)
    finally:
        stop(server)


if __name__ == "__main__":
    main()
