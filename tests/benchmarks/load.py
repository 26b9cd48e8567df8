"""Load benchmark: the real server against the forward-pass limit and a naive baseline.

    python tests/benchmarks/load.py [--duration 12] [--concurrency 1 4 16]
                                    [--workers 1] [--torch-threads 2] [--threads 8]

One run, side by side, on 127.0.0.1:

1. the plain forward pass of the same model (resnet50, seeded weights) in a
   separate process, ``torch.inference_mode()``, batch 8 and batch 1, with the
   service's total torch thread count;
2. ``gradcam-service serve`` with that model, hit by a closed-loop client
   (one thread per connection, bodies encoded once, responses not parsed) at each
   concurrency, first ``{format: array, size: layer}`` on a 224×224 JPEG, then
   ``{format: overlay, size: original}`` on a 1024×1024 JPEG; the mean batch size
   comes from ``/metrics``;
3. the naive baseline (``naive_app.py``: Flask + pytorch-grad-cam, one image per
   request) under gunicorn, 2 sync workers × 1 torch thread, same client.

Prints req/s, p50, p99, mean batch size, and the ratios the targets are set on.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
import torchvision
from PIL import Image

from service.demo.phantom import sample_phantom, to_uint8

REPO = Path(__file__).resolve().parents[2]

_FORWARD = """
import statistics, sys, time, torch, torchvision
threads, device, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
autocast = sys.argv[4] == "1"
torch.set_num_threads(threads)
torch.backends.cudnn.benchmark = True
torch.manual_seed(0)
m = torchvision.models.resnet50().eval().to(device)
xb, x1 = torch.randn(batch, 3, 224, 224, device=device), torch.randn(1, 3, 224, 224, device=device)
def run(x):
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
        m(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
for _ in range(3):
    run(xb); run(x1)
tb = [run(xb) for _ in range(7)]
t1 = [run(x1) for _ in range(15)]
print(batch / statistics.median(tb), statistics.median(t1))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _jpeg(size: int) -> str:
    gray = to_uint8(sample_phantom(np.random.default_rng(3), size, size).image)
    buffer = io.BytesIO()
    Image.fromarray(gray).convert("RGB").save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _start(command: list[str], env: dict[str, str], url: str, probe: str) -> subprocess.Popen:
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(url + probe, timeout=2).status_code in (200, 405):
                return process
        except requests.RequestException:
            time.sleep(0.3)
    _stop(process)
    raise RuntimeError(f"{command[0]} did not come up")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _closed_loop(url: str, body: bytes, concurrency: int, duration_s: float,
                 warmup_s: float = 2.0) -> tuple[float, float, float]:
    """req/s, p50 ms, p99 ms over ``duration_s`` after ``warmup_s``."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    def client() -> None:
        session = requests.Session()
        headers = {"Content-Type": "application/json"}
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                return
            response = session.post(url, data=body, headers=headers, timeout=300)
            done = time.monotonic()
            with lock:
                if response.status_code != 200:
                    failures.append(response.status_code)
                elif sent >= measure_from and done <= stop_at:
                    latencies.append(done - sent)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests: {sorted(set(failures))}")
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return len(latencies) / duration_s, statistics.median(latencies) * 1000, p99 * 1000


def _forward(args: argparse.Namespace, threads: int) -> tuple[float, float]:
    """Plain forward in a separate process: (img/s at the forward batch, batch-1 seconds)."""
    out = subprocess.run(
        [sys.executable, "-c", _FORWARD, str(threads), args.device, str(args.forward_batch),
         "1" if args.autocast else "0"], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def _batch_counts(url: str) -> tuple[float, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    total = sum(float(v) for v in re.findall(r"^gradcam_batch_size_images_sum ([0-9.e+]+)$",
                                             text, re.M))
    count = sum(float(v) for v in re.findall(r"^gradcam_batch_size_images_count ([0-9.e+]+)$",
                                             text, re.M))
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--autocast", action="store_true", help="float16 forward (CUDA)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--paired-repeats", type=int, default=3,
                        help="forward/service pairs at the top concurrency for the median ratio")
    args = parser.parse_args()
    total_threads = args.workers * args.torch_threads

    folder = Path(tempfile.mkdtemp(prefix="gradcam-load-"))
    torch.manual_seed(0)
    weights = folder / "resnet50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    (folder / "models.toml").write_text(
        f'[models.resnet50]\narch = "resnet50"\nweights = "{weights}"\n')
    payloads = {
        "array/layer, 224² JPEG": {"images": [_jpeg(224)],
                                   "heatmap": {"format": "array", "size": "layer"}},
        "overlay/original, 1024² JPEG": {"images": [_jpeg(1024)],
                                         "heatmap": {"format": "overlay", "size": "original"}},
    }
    bodies = {name: json.dumps(p).encode() for name, p in payloads.items()}

    forward_ips, forward_1_s = _forward(args, total_threads)
    paired: list[float] = []
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {device}{' with autocast' if args.autocast else ''}; "
          f"service layout: {args.workers} worker(s) × {args.threads} threads × "
          f"{args.torch_threads} torch threads, max batch {args.max_batch_size}; "
          f"{os.cpu_count()} cores")
    print(f"plain forward, resnet50, {total_threads} torch threads: batch {args.forward_batch} "
          f"**{forward_ips:.1f} img/s**, batch 1 {forward_1_s * 1000:.1f} ms\n")

    rows: dict[tuple[str, str, int], tuple[float, float, float, float]] = {}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start([sys.executable, "-m", "service.cli", "serve", "--models",
                     str(folder / "models.toml"), "--port", str(port), "--workers",
                     str(args.workers), "--threads", str(args.threads), "--device", args.device],
                    {"GRADCAM_TORCH_THREADS": str(args.torch_threads),
                     "GRADCAM_AUTOCAST": "true" if args.autocast else "false",
                     "GRADCAM_MAX_BATCH_SIZE": str(args.max_batch_size)}, url, "/readyz")
    try:
        for name, body in bodies.items():
            for concurrency in args.concurrency:
                before = _batch_counts(url)
                result = _closed_loop(url + "/v1/explain", body, concurrency, args.duration)
                after = _batch_counts(url)
                mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                rows[("service", name, concurrency)] = (*result, mean_batch)
        # The forward figure drifts between runs on a small machine: pair it with
        # the service at the top concurrency, alternately, and take the median ratio.
        top = max(args.concurrency)
        first_body = next(iter(bodies.values()))
        for _ in range(args.paired_repeats):
            forward_r = _forward(args, total_threads)[0]
            service_r = _closed_loop(url + "/v1/explain", first_body, top, args.duration)[0]
            paired.append(service_r / forward_r)
    finally:
        _stop(server)

    if not args.skip_naive:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        naive = _start([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                        "--pythonpath", str(REPO / "tests" / "benchmarks"), "--timeout", "300",
                        "naive_app:app"],
                       {"NAIVE_WEIGHTS": str(weights), "NAIVE_TORCH_THREADS": "1"}, url,
                       "/v1/explain")
        try:
            for name, body in bodies.items():
                for concurrency in args.concurrency:
                    result = _closed_loop(url + "/v1/explain", body, concurrency, args.duration)
                    rows[("naive", name, concurrency)] = (*result, 1.0)
        finally:
            _stop(naive)

    print("| server | request | concurrency | req/s | p50 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for (system, name, concurrency), (rps, p50, p99, batch) in rows.items():
        print(f"| {system} | {name} | {concurrency} | {rps:.1f} | {p50:.0f} | {p99:.0f} | "
              f"{batch:.1f} |")
    print()
    if paired:
        ratios = ", ".join(f"{r:.2f}" for r in paired)
        print(f"{next(iter(bodies))}, concurrency {max(args.concurrency)}, {len(paired)} paired "
              f"repeats (forward, then service): service / forward = {ratios}; "
              f"median **{statistics.median(paired):.2f}×**")
    for name in bodies:
        top = max(args.concurrency)
        service = rows[("service", name, top)][0]
        line = f"{name}, concurrency {top}: service / forward = **{service / forward_ips:.2f}×**"
        if ("naive", name, top) in rows:
            line += f", service / naive = **{service / rows[('naive', name, top)][0]:.1f}×**"
        print(line)
        if 1 in args.concurrency:
            p50 = rows[("service", name, 1)][1]
            bound = 1.2 * forward_1_s * 1000 + 15
            print(f"{name}, concurrency 1: p50 {p50:.0f} ms against the target "
                  f"1.2 × {forward_1_s * 1000:.0f} + 15 = {bound:.0f} ms")


if __name__ == "__main__":
    main()
