"""Peak and settled RSS of every serve process under the largest requests the defaults allow.

Starts ``serve`` (1 HTTP worker) from this checkout and, with ``--compare-with
CHECKOUT``, from another one, sends each request below once, samples the RSS of
the supervisor, the gunicorn master, the worker and the engine every 10 ms, and
prints each process's peak during the request and its RSS 2 s after it.

- ``4 × 16 MP overlay``: four 4000² RGB JPEGs, overlay PNGs at original size
  (64 MP drawn: the output budget; 64 MP decoded, under the 100 MP request budget);
- ``25 MP 16-bit overlay``: one 5000² 16-bit PNG (decoded as float), overlay at
  original size (the per-image budget);
- ``4 Mi array``: one 2048² JPEG, ``array`` at original size (the array budget,
  ~40 MB of JSON).

    python tests/benchmarks/memory.py --compare-with /tmp/before
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import processes, rss_mb, serve, stop  # noqa: E402


def _jpeg(size: int) -> bytes:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=2)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png16(size: int) -> bytes:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    values = (65535 * (0.5 + 0.5 * np.sin(6 * x) * np.cos(5 * y))).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def _requests() -> dict[str, bytes]:
    def body(images: list[bytes], fmt: str) -> bytes:
        return json.dumps(
            {
                "images": [base64.b64encode(i).decode() for i in images],
                "heatmap": {"format": fmt, "size": "original"},
            }
        ).encode()

    return {
        "4 × 16 MP overlay": body([_jpeg(4000)] * 4, "overlay"),
        "25 MP 16-bit overlay": body([_png16(5000)], "overlay"),
        "4 Mi array": body([_jpeg(2048)], "array"),
    }


def _sample(pids: dict[str, int], peaks: dict[str, float], stop: threading.Event) -> None:
    while not stop.wait(0.01):
        for role, pid in pids.items():
            peaks[role] = max(peaks[role], rss_mb(pid))


def measure(checkout: Path, bodies: dict[str, bytes]) -> dict[str, dict[str, tuple]]:
    process, url = serve(checkout, env={"GRADCAM_TORCH_THREADS": "2"})
    rows: dict[str, dict[str, tuple]] = {}
    try:
        pids = processes(process.pid)
        for name, body in bodies.items():
            peaks = {role: rss_mb(pid) for role, pid in pids.items()}
            finished = threading.Event()
            sampler = threading.Thread(target=_sample, args=(pids, peaks, finished))
            sampler.start()
            started = time.monotonic()
            response = requests.post(
                f"{url}/v1/explain",
                data=body,
                timeout=300,
                headers={"Content-Type": "application/json"},
            )
            took = time.monotonic() - started
            finished.set()
            sampler.join()
            time.sleep(2)
            pids = processes(process.pid)  # a worker may have been replaced
            settled = {role: rss_mb(pid) for role, pid in pids.items()}
            rows[name] = {
                "status": (response.status_code, len(response.content) / 1e6, took),
                **{
                    role: (peaks.get(role, 0.0), settled.get(role, 0.0))
                    for role in ("supervisor", "master", "worker 0", "engine")
                },
            }
    finally:
        stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT")
    args = parser.parse_args()
    bodies = _requests()
    print("request sizes: " + ", ".join(f"{n} {len(b) / 1e6:.1f} MB" for n, b in bodies.items()))
    checkouts = [("this checkout", ROOT)]
    if args.compare_with:
        checkouts.append((str(args.compare_with), args.compare_with.resolve()))
    print(
        "| server | request | status | answer MB | s | worker peak / after MB "
        "| engine peak / after MB | master, supervisor peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, checkout in checkouts:
        for name, row in measure(checkout, bodies).items():
            status, size, took = row["status"]
            print(
                f"| {label} | {name} | {status} | {size:.1f} | {took:.1f} | "
                f"{row['worker 0'][0]:.0f} / {row['worker 0'][1]:.0f} | "
                f"{row['engine'][0]:.0f} / {row['engine'][1]:.0f} | "
                f"{row['master'][0]:.0f}, {row['supervisor'][0]:.0f} |"
            )


if __name__ == "__main__":
    main()
