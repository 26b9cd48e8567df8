"""What the DICOM result formats cost, side by side with the pictures they carry.

    python tests/benchmarks/dicom_out.py [--runs 15]

One explain call in-process on the demo model (CPU), median of ``--runs``: the CR
example as an ``overlay`` PNG, as a ``dicom-sc`` (uncompressed and JPEG), as a
``dicom-seg`` and as an ``overlay`` with ``report: "dicom-sr"``, and pydicom's CT as an
``array``, a ``dicom-pm`` and a ``dicom-seg``; ratios to the picture formats.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from pathlib import Path

from pydicom.data import get_testdata_file

from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.pipeline.explain import explain

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _median_ms(
    runtime: Runtime, image: str, heatmap: dict, runs: int, report: str | None = None
) -> float:
    request = ExplainRequest.model_validate(
        {"images": [image], "heatmap": heatmap, "report": report}
    )
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        explain(request, runtime, runtime.settings)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    cr = base64.b64encode((EXAMPLES / "phantom_nodule.dcm").read_bytes()).decode()
    ct = base64.b64encode(Path(get_testdata_file("CT_small.dcm")).read_bytes()).decode()
    runtime = Runtime(Settings(device="cpu")).start()
    try:
        overlay = _median_ms(runtime, cr, {"format": "overlay"}, runs)
        array = _median_ms(runtime, ct, {"format": "array"}, runs)
        rows = [
            ("CR 420×380", "overlay (PNG)", overlay, overlay),
            (
                "CR 420×380",
                "dicom-sc",
                _median_ms(runtime, cr, {"format": "dicom-sc"}, runs),
                overlay,
            ),
            (
                "CR 420×380",
                "dicom-sc (JPEG)",
                _median_ms(runtime, cr, {"format": "dicom-sc", "encoding": "jpeg"}, runs),
                overlay,
            ),
            (
                "CR 420×380",
                "dicom-seg",
                _median_ms(runtime, cr, {"format": "dicom-seg"}, runs),
                overlay,
            ),
            (
                "CR 420×380",
                "overlay + dicom-sr",
                _median_ms(runtime, cr, {"format": "overlay"}, runs, report="dicom-sr"),
                overlay,
            ),
            ("CT 128×128", "array", array, array),
            (
                "CT 128×128",
                "dicom-pm",
                _median_ms(runtime, ct, {"format": "dicom-pm"}, runs),
                array,
            ),
            (
                "CT 128×128",
                "dicom-seg",
                _median_ms(runtime, ct, {"format": "dicom-seg"}, runs),
                array,
            ),
        ]
    finally:
        runtime.close()
    print(f"{'image':12s} {'format':18s} {'median':>9s} {'ratio':>6s}")
    for image, name, ms, base in rows:
        print(f"{image:12s} {name:18s} {ms:7.1f} ms {ms / base:5.2f}×")


if __name__ == "__main__":
    main()
