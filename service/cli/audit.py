"""``gradcam-service audit``: where a model looks over a dataset (``trust/audit.py``),
``report.json`` and ``report.html``. The inputs and the boxes file are checked before a
model loads; an interrupted audit is resumed by running the same command again."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli import common
from service.cli.common import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Subparsers
from service.contract.errors import ConfigError, ServiceError
from service.contract.terms import METHODS
from service.trust.audit import AuditRun, audit
from service.trust.audit_inputs import AuditUsage, dicomweb_inputs, find_inputs, read_boxes
from service.trust.audit_log import AuditSettings
from service.trust.audit_records import Thresholds


def add_parser(sub: Subparsers) -> None:
    parser = common.add_command(
        sub,
        "audit",
        "where a model looks over a dataset: report.json and report.html, flagging "
        "heatmaps outside their boxes or on the border (docs/trust.md)",
        [
            "gradcam-service audit --images scans/ --boxes boxes.csv --out audit",
            "gradcam-service audit --dicomweb studies.txt --target nodule --out audit",
        ],
        "Explains every image through the batched engine, logging each as it goes: an "
        "interrupted audit resumes when the same command runs again.",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=[],
        metavar="DIR|FILE",
        help="folders (searched recursively) and image files; default: none (then --dicomweb)",
    )
    parser.add_argument(
        "--dicomweb",
        metavar="FILE",
        help="a file of DICOMweb studies to audit, one BASE/studies/STUDY-UID per line; "
        "default: none",
    )
    parser.add_argument(
        "--boxes",
        metavar="CSV",
        help="CSV image,label,x0,y0,x1,y1: where each image's evidence lies; default: "
        "none (then only the mass on the border is judged)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the log and the reports"
    )
    common.add_model_options(parser)
    parser.add_argument("--layer", help="target layer (dotted name); default: the model's")
    parser.add_argument(
        "--method",
        **common.one_of(METHODS),
        default="gradcam",
        help="the CAM variant (docs/correctness.md)",
    )
    parser.add_argument("--target", help="class index or label to explain; default: top-1")
    parser.add_argument(
        "--faithfulness", action="store_true", help="deletion and insertion AUCs per image"
    )
    parser.add_argument(
        "--max-outside",
        type=float,
        default=0.5,
        help="flag an image when more than this share of its map lies away from its boxes",
    )
    parser.add_argument(
        "--max-border",
        type=float,
        default=0.5,
        help="without boxes: flag an image when more than this share of its map lies on the "
        "border (the outer 10%%)",
    )
    parser.add_argument(
        "--flag-share",
        type=float,
        default=0.25,
        help="flag a class when at least this share of its images is flagged",
    )
    parser.add_argument(
        "--min-score", type=float, default=0.5, help="judge only explanations scoring this much"
    )
    parser.add_argument(
        "--restart", action="store_true", help="start over instead of resuming in --out"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (there is none off a terminal)"
    )


def run(args: argparse.Namespace) -> int:
    asked = AuditRun(
        AuditSettings(
            method=args.method,
            target=args.target,
            faithfulness=bool(args.faithfulness),
            boxes=Path(args.boxes) if args.boxes else None,
            thresholds=Thresholds(
                args.max_outside, args.max_border, args.flag_share, args.min_score
            ),
        ),
        Path(args.out),
        model=args.model,
        layer=args.layer,
        restart=args.restart,
        quiet=args.quiet,
    )
    try:
        items = find_inputs(args.images)
        if args.dicomweb:
            timeout_s = common.settings_of(args).request_timeout_s
            items += dicomweb_inputs(Path(args.dicomweb), timeout_s)
        common.model_name(args)  # an unknown --model costs no model load
        if not items:
            raise AuditUsage("nothing to audit: give --images or --dicomweb")
        if asked.settings.boxes is not None:
            read_boxes(asked.settings.boxes)
        runtime = common.runtime(args)
        try:
            return EXIT_INPUT if audit(asked, runtime, items) else EXIT_OK
        finally:
            runtime.close()
    except (AuditUsage, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        return common.told(error)
    except KeyboardInterrupt:
        print(
            f"interrupted; run the same command again to resume from {args.out}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
