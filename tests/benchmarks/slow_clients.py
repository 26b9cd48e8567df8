"""Slow and stalled clients against a live server: how fast are others still answered?

Starts ``serve`` (this checkout, and with ``--compare-with CHECKOUT`` another one,
e.g. a git worktree of an older commit), attaches ``--per-kind`` clients of each
kind in ``tests/process/reliability/slow_clients.py`` (silent, trickled headers, trickled
body, body shorter than its Content-Length, a 10 MB answer never read), and
prints the slowest of 5 answers to ``/healthz`` and to a small explain request,
before and while they are attached. 99 s means no answer within 10 s.

    python tests/benchmarks/slow_clients.py --threads 4 --per-kind 16 \\
        --compare-with /tmp/before
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.process.reliability.slow_clients import SlowClients, answer_times  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import serve, stop  # noqa: E402


def measure(checkout: Path, threads: int, per_kind: int) -> tuple[dict, dict]:
    process, url = serve(checkout, threads=threads, env={"GRADCAM_TORCH_THREADS": "1"})
    port = int(url.rsplit(":", 1)[1])
    try:
        calm = answer_times(url)
        clients = SlowClients("127.0.0.1", port, per_kind).start()
        try:
            time.sleep(1.0)
            abused = answer_times(url)
        finally:
            clients.close()
    finally:
        stop(process)
    return calm, abused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--per-kind", type=int, default=16)
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT")
    args = parser.parse_args()
    checkouts = [("this checkout", ROOT)]
    if args.compare_with:
        checkouts.append((str(args.compare_with), args.compare_with.resolve()))
    print(
        f"{args.per_kind} clients of each of 5 kinds, {args.threads} request threads, "
        "1 worker; slowest of 5 answers (s)"
    )
    print(
        f"{'server':<28} {'healthz calm':>12} {'explain calm':>12} {'healthz abused':>15} "
        f"{'explain abused':>15}"
    )
    for label, checkout in checkouts:
        calm, abused = measure(checkout, args.threads, args.per_kind)
        print(
            f"{label:<28} {calm['healthz']:>12.3f} {calm['explain']:>12.3f} "
            f"{abused['healthz']:>15.3f} {abused['explain']:>15.3f}"
        )


if __name__ == "__main__":
    main()
