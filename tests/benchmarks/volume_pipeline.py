"""A CT series from DICOMweb to a stored Parametric Map, end to end, and where the time and
the memory go.

    PYTHONPATH=. python tests/benchmarks/volume_pipeline.py [--slices 256] [--side 512]
                                                            [--input 96] [--repeats 3]

A synthetic CT (a body of soft tissue in air, two lungs, a nodule; ``--side``² pixels at
0.7 mm, ``--slices`` slices of 1.25 mm, 16-bit) is stored in a real Orthanc (Debian's,
with its DICOMweb plugin, on 127.0.0.1) by STOW-RS; a real ``serve`` with MONAI's 3-D
DenseNet-121 (random weights: the time does not depend on them) at ``--input``³ is asked,
``--repeats`` times, to explain the series named by its UIDs (WADO-RS of the whole
series), with ``dicom-pm`` and a ``dicom-sr`` report stored back (STOW-RS). Prints, per
request, the wall time and each stage from the service's own histogram (fetch, the rest
of decode: read and fit, queue_wait, compute, transport, render: the objects made,
store), the peak memory of the service's process tree over its idle size, and what the
service's budget reserved for the request beside what one volume's reservation lets in
at once.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import requests

from service.memory import children
from service.pipeline.dicomweb import DicomWebServers, store
from tests.dicom_series import write_ct_series
from tests.helpers import LiveServer
from tests.process.pacs.test_dicomweb import _running_orthanc

STAGES = ("fetch", "decode", "queue_wait", "compute", "transport", "render", "store")


def ct_volume(side: int, slices: int) -> np.ndarray:
    """HU (side, side, slices): air, an elliptic body, two lungs, a dense nodule."""
    i, j = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    plane = np.full((side, side), -1000.0)
    plane[(i / 0.9) ** 2 + (j / 0.7) ** 2 <= 1] = 40.0
    for centre in (-0.4, 0.4):
        plane[((i - centre) / 0.3) ** 2 + (j / 0.45) ** 2 <= 1] = -850.0
    volume = np.repeat(plane[:, :, None], slices, axis=2)
    k = np.arange(slices)[None, None, :]
    nodule = ((i - 0.4) / 0.05)[..., None] ** 2 + (j / 0.05)[..., None] ** 2
    volume[(nodule + ((k - slices / 2) / (slices * 0.03)) ** 2) <= 1] = 100.0
    noise = np.random.default_rng(0).normal(0, 10, volume.shape)
    return np.round(volume + noise)


def stage_sums(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=30).text
    found = {}
    for stage in STAGES:
        pattern = rf'gradcam_stage_duration_seconds_sum{{stage="{stage}"}} ([0-9.e+-]+)'
        match = re.search(pattern, text)
        found[stage] = float(match.group(1)) if match else 0.0
    return found


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (serve → gunicorn → its workers)."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children(pid)
    return found


def tree_rss_mb(root: int) -> float:
    total = 0
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class PeakSampler(threading.Thread):
    """The service's process tree's resident size, sampled every 20 ms."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.done = root, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.root))
            time.sleep(0.02)


def models_file(folder: Path, size: int) -> Path:
    (folder / "labels.txt").write_text("normal\nnodule\n")
    path = folder / "models.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [models.ct3d]
            library = "monai"
            arch = "DenseNet121"
            arch_args = {{ spatial_dims = 3, in_channels = 1, out_channels = 2 }}
            labels = "labels.txt"
            input_size = [{size}, {size}, {size}]
            window = [-1000, 400]
            spacing = [1.5, 1.5, 2.0]
            modalities = ["CT"]
            """
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--input", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="volume-pipeline-"))
    started = time.perf_counter()
    files = write_ct_series(
        ct_volume(args.side, args.slices), (0.7, 0.7, 1.25), (-180.0, -180.0, 0.0), signed=True
    )
    written_s = time.perf_counter() - started
    megabytes = sum(map(len, files)) / 2**20
    print(f"series: {len(files)} slices of {args.side}², {megabytes:.0f} MB ({written_s:.1f} s)")
    (folder / "orthanc").mkdir()
    with _running_orthanc(folder / "orthanc") as orthanc:
        headers = [pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True) for f in files]
        first = headers[0]
        uids = [(str(h.SOPInstanceUID), f) for h, f in zip(headers, files, strict=True)]
        started = time.perf_counter()
        outcomes = store(uids, orthanc.url, DicomWebServers(orthanc.url), 600)
        assert all(o.ok for o in outcomes), outcomes[:3]
        print(f"STOW-RS of the series to Orthanc: {time.perf_counter() - started:.1f} s")
        live = LiveServer(
            env={
                "GRADCAM_MODELS_FILE": str(models_file(folder, args.input)),
                "GRADCAM_DICOMWEB_SERVERS": orthanc.url,
                "GRADCAM_REQUEST_TIMEOUT_S": "600",
            },
            ready_s=300,
        )
        try:
            body = {
                "images": [
                    {
                        "dicomweb": {
                            "url": orthanc.url,
                            "study": str(first.StudyInstanceUID),
                            "series": str(first.SeriesInstanceUID),
                        }
                    }
                ],
                "heatmap": {"format": "dicom-pm"},
                "report": "dicom-sr",
                "store": {"url": orthanc.url},
            }
            run(live, body, args.repeats)
        finally:
            live.stop()


def run(live: LiveServer, body: dict, repeats: int) -> None:
    root = live.process.pid
    idle = tree_rss_mb(root)
    print(f"service idle: {idle:.0f} MB (its process tree)")
    print("| request | wall s | " + " | ".join(STAGES) + " | peak over idle MB |")
    print("|---|---|" + "---|" * len(STAGES) + "---|")
    walls = []
    for n in range(repeats):
        before = stage_sums(live.url)
        sampler = PeakSampler(root)
        sampler.start()
        started = time.perf_counter()
        answer = requests.post(f"{live.url}/v1/explain", json=body, timeout=900)
        wall = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        assert answer.status_code == 200, answer.text[:500]
        result = answer.json()["results"][0]
        heatmap = result["explanations"][0]["heatmap"]
        assert heatmap.get("stored", {}).get("ok"), heatmap.get("stored") or heatmap.get("reason")
        after = stage_sums(live.url)
        spent = {stage: after[stage] - before[stage] for stage in STAGES}
        spent["decode"] -= spent["fetch"]  # fetch is timed within decode
        walls.append(wall)
        cells = " | ".join(f"{spent[stage]:.2f}" for stage in STAGES)
        print(f"| {n + 1} | {wall:.2f} | {cells} | {sampler.peak - idle:.0f} |", flush=True)
    print(f"median wall: {statistics.median(walls):.2f} s")


if __name__ == "__main__":
    main()
