"""A light request beside heavy ones: is it still answered, and how fast?

Starts ``serve`` with its defaults (this checkout, and with ``--compare-with CHECKOUT``
another one, e.g. a git worktree of an older commit), has ``--heavy`` clients loop on
requests of 8 phantom images × 4 classes with ``include: ["faithfulness"]`` (32
explanations, each 39 more forward passes), and once they are under way sends
``--light`` one-image requests, one after another, ``--pause-s`` apart. Prints how many
light requests were answered 200, their median and slowest time, and what the heavy
clients got.

    python tests/benchmarks/heavy_beside_light.py --compare-with /tmp/before
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import serve, stop  # noqa: E402

from tests.helpers import phantom_png  # noqa: E402

HEAVY = {
    "images": [base64.b64encode(phantom_png(seed, 256, 256)).decode() for seed in range(8)],
    "targets": [[0, 1, 2, 3]] * 8,
    "include": ["faithfulness"],
}
LIGHT = {"images": [base64.b64encode(phantom_png(99, 256, 256)).decode()]}


def _post(url: str, body: dict) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = requests.post(f"{url}/v1/explain", json=body, timeout=120).status_code
    except requests.RequestException:
        status = 0
    return status, time.monotonic() - started


def measure(checkout: Path, heavy_clients: int, light: int, pause_s: float) -> dict:
    process, url = serve(checkout)
    try:
        _post(url, LIGHT)  # warm
        stop_heavy = threading.Event()
        heavy: list[tuple[int, float]] = []

        def loop() -> None:
            while not stop_heavy.is_set():
                heavy.append(_post(url, HEAVY))

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(heavy_clients)]
        for thread in threads:
            thread.start()
        time.sleep(3.0)  # the heavy ones are under way
        answers = []
        for _ in range(light):
            answers.append(_post(url, LIGHT))
            time.sleep(pause_s)
        stop_heavy.set()
        for thread in threads:
            thread.join(180)
    finally:
        stop(process)
    times = [took for status, took in answers if status == 200]
    return {
        "light_ok": len(times),
        "light_statuses": Counter(status for status, _ in answers),
        "light_median_s": statistics.median(times) if times else float("nan"),
        "light_max_s": max(times) if times else float("nan"),
        "heavy_statuses": Counter(status for status, _ in heavy),
        "heavy_median_s": statistics.median(t for s, t in heavy if s == 200)
        if any(s == 200 for s, _ in heavy)
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy", type=int, default=2, help="heavy clients (default 2)")
    parser.add_argument("--light", type=int, default=10, help="light requests (default 10)")
    parser.add_argument("--pause-s", type=float, default=0.5)
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT")
    args = parser.parse_args()
    checkouts = [("this checkout", ROOT)]
    if args.compare_with:
        checkouts.append((str(args.compare_with), args.compare_with.resolve()))
    for name, checkout in checkouts:
        got = measure(checkout, args.heavy, args.light, args.pause_s)
        print(
            f"{name}: light {got['light_ok']}/{args.light} answered "
            f"({dict(got['light_statuses'])}), median {got['light_median_s']:.2f} s, "
            f"slowest {got['light_max_s']:.2f} s; heavy {dict(got['heavy_statuses'])}, "
            f"median {got['heavy_median_s']:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
