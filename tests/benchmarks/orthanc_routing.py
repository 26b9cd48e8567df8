"""What routing studies through the service with Orthanc (deploy/orthanc/) costs.

    python tests/benchmarks/orthanc_routing.py [--series 5] [--size 10] [--runs 2]

A fresh Orthanc with the recipe (stable after 1 s) and a fresh service (1 worker, CPU),
on 127.0.0.1; ``--series`` series of ``--size`` copies of the CR example (new UIDs),
in two studies, sent by STOW-RS one series after the other. For each run, once as it
is and once with the service stopped after the first series is done and started
again on the same port: images per second from the first series stable to the last
results stored, and the latency the routing adds to each series (stable to results
stored). Needs Debian's orthanc, orthanc-dicomweb and orthanc-python.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import ServerFactory
from tests.process.pacs.test_orthanc_routing import route_fifty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=5)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        for restart in (False, True):
            servers = ServerFactory()
            try:
                with tempfile.TemporaryDirectory(prefix="gradcam-orthanc-") as folder:
                    figures = route_fifty(Path(folder), restart, servers, args.series, args.size)
            finally:
                servers.stop_all()
            label = "with a restart of the service" if restart else "as it is"
            print(f"run {run}, {label}: {figures}", flush=True)


if __name__ == "__main__":
    main()
