"""The audit's ground truth: the honest demo model against the one that learned a shortcut.

    python tests/benchmarks/audit_shortcut.py [--images 200] [--figure docs/audit-shortcut.png]
        [--screenshot docs/audit-report.png]

Writes ``--images`` phantoms that all show a nodule and carry the corner marker
(``tools/demo_model/audit_set.py``, seed 7, 256×256) with their nodule boxes, then runs
``gradcam-service audit --target nodule`` on each model of ``service/demo/shortcut.toml``
(``phantom``, ``phantom_shortcut``) and prints per model the verdict, the flagged images,
the median mass near the boxes and on the border, and the audit's time. ``--figure``
draws each model's mean nodule map and three overlays; ``--screenshot`` opens the
shortcut model's ``report.html`` in headless Chromium and saves the page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.cli import main as cli  # noqa: E402
from tools.demo_model.audit_set import write_audit_set  # noqa: E402

MODELS = ("phantom", "phantom_shortcut")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--figure", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit-shortcut-"))
    images = work / "images"
    write_audit_set(images, args.images, seed=7, marker="nodule", require="nodule")
    reports = {}
    print(f"{args.images} phantoms with a nodule and the corner marker, class nodule explained")
    print("model              verdict        flagged  near box (median)  on border (median)  time")
    for model in MODELS:
        out = work / model
        started = time.perf_counter()
        code = cli(
            [
                "audit",
                "--images",
                str(images),
                "--boxes",
                str(images / "boxes.csv"),
                "--models",
                str(ROOT / "service/demo/shortcut.toml"),
                "--model",
                model,
                "--target",
                "nodule",
                "--out",
                str(out),
                "-q",
            ]
        )
        elapsed = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"the audit of {model} exited {code}")
        report = json.loads((out / "report.json").read_text())
        reports[model] = report
        nodule = report["classes"]["nodule"]
        verdict = "FLAGGED" if report["verdict"]["flagged"] else "not flagged"
        print(
            f"{model:<18} {verdict:<14} {nodule['flagged_images']:>3}/{nodule['images']:<4}"
            f" {nodule['mass_near_box']['median']:>17.3f}  "
            f"{nodule['mass_on_border']['median']:>18.3f}  {elapsed:.1f} s"
        )
    if args.figure is not None:
        _figure(work, reports, args.figure)
    if args.screenshot is not None:
        _screenshot(work / "phantom_shortcut" / "report.html", args.screenshot)
    shutil.rmtree(work)


def _figure(work: Path, reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, axes = plt.subplots(2, 4, figsize=(11, 5.8))
    for row, model in enumerate(MODELS):
        report = reports[model]
        nodule = report["classes"]["nodule"]
        ax = axes[row, 0]
        ax.imshow(Image.open(work / model / nodule["mean_map"]))
        verdict = "FLAGGED" if report["verdict"]["flagged"] else "not flagged"
        ax.set_title(f"{model}: {verdict}\nmean nodule map", fontsize=10)
        for column, record in enumerate(report["images"][:3], start=1):
            ax = axes[row, column]
            ax.imshow(Image.open(work / model / record["thumbnail"]))
            ax.set_title(
                f"{record['key']}\nnear box {record['mass_near_box']:.2f}, "
                f"border {record['mass_on_border']:.2f}",
                fontsize=9,
            )
        for ax in axes[row]:
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"wrote {path}")


def _screenshot(page: Path, path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: no screenshot")
        return
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={path}",
            "--window-size=1100,1250",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
