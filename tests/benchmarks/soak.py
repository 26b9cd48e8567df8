"""Soak: the service at saturation for minutes, RSS of every process sampled.

Starts ``serve`` (2 HTTP workers), runs ``--clients`` client threads for
``--minutes`` with a mix of requests (small arrays, 1024² overlays, several
images per request, DICOM, and bad requests that must get 4xx), samples the RSS
of the supervisor, gunicorn master, workers and engine every 2 s, and prints:
the answers by status, and each process's RSS with no request in flight
(clients paused for 3 s) after a minute of warm-up and at the end, the growth
between them, and its peak under load. It fails (exit 1) on any
status outside 200/4xx-expected/503, or growth of 5% or more.

    python tests/benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import base64
import collections
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
sys.path.insert(0, str(ROOT))

from service.demo.phantom import sample_phantom, to_uint8  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import processes, rss_mb, serve, stop  # noqa: E402


def _png(seed: int, size: int) -> str:
    image = to_uint8(sample_phantom(np.random.default_rng(seed), size, size).image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _mix() -> list[tuple[str, bytes, int]]:
    """(name, body, expected status)."""
    from pydicom.data import get_testdata_file

    dicom = base64.b64encode(Path(get_testdata_file("CT_small.dcm")).read_bytes()).decode()

    def body(**fields: object) -> bytes:
        return json.dumps(fields).encode()

    return [
        (
            "array/layer",
            body(images=[_png(1, 224)], heatmap={"format": "array", "size": "layer"}),
            200,
        ),
        ("overlay 1024²", body(images=[_png(2, 1024)], heatmap={"format": "overlay"}), 200),
        ("8 images png", body(images=[_png(s, 256) for s in range(8)], targets=[[0, 1]] * 8), 200),
        ("dicom overlay", body(images=[dicom], heatmap={"format": "overlay"}), 200),
        ("bad base64", body(images=["%%%"]), 422),
        ("unknown label", body(images=[_png(3, 64)], targets=["cat"]), 422),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    server, url = serve(ROOT, workers=2, env={"GRADCAM_TORCH_THREADS": "1"})
    try:
        mix = _mix()
        counts: collections.Counter[tuple[str, int]] = collections.Counter()
        unexpected: list[str] = []
        finish = threading.Event()
        go = threading.Event()  # cleared: clients pause between requests
        go.set()
        busy = [0]
        lock = threading.Lock()

        def client(seed: int) -> None:
            session = requests.Session()
            rng = np.random.default_rng(seed)
            while not finish.is_set():
                go.wait()
                with lock:
                    busy[0] += 1
                name, body, expected = mix[int(rng.integers(len(mix)))]
                try:
                    status = session.post(
                        f"{url}/v1/explain",
                        data=body,
                        timeout=120,
                        headers={"Content-Type": "application/json"},
                    ).status_code
                except requests.RequestException as error:
                    status = 0
                    unexpected.append(f"{name}: {type(error).__name__}")
                counts[(name, status)] += 1
                if status not in (expected, 503):
                    unexpected.append(f"{name}: {status}")
                with lock:
                    busy[0] -= 1

        def idle_rss() -> dict[str, float]:
            """Every process's RSS with no request in flight (and a trim since)."""
            go.clear()
            while busy[0]:
                time.sleep(0.05)
            time.sleep(3)
            rss = {role: rss_mb(pid) for role, pid in processes(server.pid).items()}
            go.set()
            return rss

        threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        samples: list[tuple[float, dict[str, float]]] = []
        end = started + args.minutes * 60
        idle_at_warm: dict[str, float] | None = None
        while time.monotonic() < end:
            if idle_at_warm is None and time.monotonic() - started > min(60, args.minutes * 15):
                idle_at_warm = idle_rss()
            samples.append(
                (
                    time.monotonic() - started,
                    {role: rss_mb(pid) for role, pid in processes(server.pid).items()},
                )
            )
            time.sleep(2)
        idle_at_end = idle_rss()
        finish.set()
        for thread in threads:
            thread.join(timeout=130)
    finally:
        stop(server)

    total = sum(counts.values())
    print(
        f"{args.minutes:g} min, {args.clients} clients, {total} requests "
        f"({total / (args.minutes * 60):.1f}/s)"
    )
    for (name, status), count in sorted(counts.items()):
        print(f"  {name:<14} {status}: {count}")
    # Under load each sample includes requests' temporaries; a leak shows when idle.
    # So: every process's RSS with nothing in flight after warm-up and at the end.
    assert idle_at_warm is not None
    print(
        "| process | idle RSS after warm-up MB | idle RSS at the end MB | growth | "
        "peak under load MB |"
    )
    print("|---|---|---|---|---|")
    worst = 0.0
    for role in sorted(idle_at_end):
        before, after = idle_at_warm.get(role, 0.0), idle_at_end[role]
        peak = max(s.get(role, 0.0) for _, s in samples)
        if before > 0:
            growth = (after - before) / before
            worst = max(worst, growth)
            print(f"| {role} | {before:.0f} | {after:.0f} | {growth:+.1%} | {peak:.0f} |")
    print(f"unexpected answers: {len(unexpected)} {unexpected[:5]}; worst growth {worst:+.1%}")
    return 0 if not unexpected and worst < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
