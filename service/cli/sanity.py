"""``gradcam-service sanity --images DIR|FILE... [--out DIR]``: the model-parameter
randomisation test (``trust/sanity.py``) on image files, as a table on stdout,
``sanity.png`` and ``sanity.json``.

Images take the offline path to the model input (``pipeline/offline.py``: the layer and
target chosen as the API chooses them; decode, fit and the per-image limits of each
file; ``batch_inputs``: normalised on the device). The model is loaded as the models file
describes it (``load_model``: float32, batch norms unfolded, no server tuning): the
check is about the weights, not about how fast they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli import common, wording
from service.cli.common import EXIT_INPUT, EXIT_OK, OutputExists, Subparsers, Usage
from service.contract.terms import METHODS
from service.pipeline.images import PreparedImage
from service.pipeline.offline import OfflinePlan, plan, prepare_file
from service.trust.inputs import NoSuchInput, image_files

OUTPUTS = ("sanity.png", "sanity.json")


def add_parser(sub: Subparsers) -> None:
    parser = common.add_command(
        sub,
        "sanity",
        "check that the maps change when the model's layers are randomised, from the "
        "output down (Adebayo et al., 2018): a table, sanity.png and sanity.json",
        [
            "gradcam-service sanity --images examples/phantom_nodule.png "
            "examples/phantom_mass_tube.png --out sanity",
            "gradcam-service sanity --images scans/ --method gradcam++ --depth 2 --out sanity",
        ],
        "Prints, per randomisation step, how alike the maps stay (Spearman, SSIM) and a "
        "PASS or FAIL verdict (docs/trust.md#sanity-check). No server is needed.",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="DIR|FILE",
        help="image folders (their image files, not recursive) and/or files",
    )
    common.add_model_options(parser)
    parser.add_argument("--layer", help="target layer (dotted name); default: the model's")
    parser.add_argument(
        "--method",
        **common.one_of(METHODS),
        default="gradcam",
        help="the CAM variant (docs/correctness.md)",
    )
    parser.add_argument(
        "--target", help="class index or label to explain; default: each image's top-1 class"
    )
    parser.add_argument(
        "--out", default="sanity-out", metavar="DIR", help="folder for sanity.png and sanity.json"
    )
    parser.add_argument(
        "--max-images", type=int, default=32, metavar="N", help="use the first N images"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the re-initialisation (default: 0)"
    )
    parser.add_argument(
        "--depth",
        type=int,
        help="randomise blocks: modules grouped by the first N parts of their names; "
        "default: one layer (with its norm) per step",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite sanity.png and sanity.json in --out (without it: stop, exit code 3)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the check; exit 1 if some inputs could not be read (each told on stderr).
    ``Usage``, ``OutputExists``, ``ConfigError`` or a ``ServiceError`` (a layer or class
    the model does not have) before any work."""
    import torch

    from service.engine.batch_inputs import batch_inputs, normaliser
    from service.engine.loading.models import load_model
    from service.engine.runtime import choose_device
    from service.transport.interface import Job
    from service.trust.plot import draw_plot
    from service.trust.sanity import CascadeSettings, NothingToCompare, run_sanity

    if args.max_images < 1:
        raise Usage("--max-images must be at least 1")
    if args.depth is not None and args.depth < 1:
        raise Usage("--depth must be at least 1")
    out = Path(args.out)
    for name in OUTPUTS:
        if (out / name).exists() and not args.force:
            raise OutputExists(f"{out / name} exists (--force overwrites, or choose another --out)")
    paths = image_paths(args.images, args.max_images)
    settings = common.settings_of(args)
    name = common.model_name(args)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model = load_model(name, settings.models_config(), choose_device(settings.device))
    chosen = plan(model.info(), settings, args.layer, [args.target] if args.target else None)
    kept, prepared, failures = _prepare(paths, chosen)
    if not prepared:
        print("error: no image could be read: nothing to check", file=sys.stderr)
        return EXIT_INPUT
    job = Job(
        model=model.name,
        layer=chosen.layer,
        images=[p.pixels for p in prepared],
        boxes=[p.box for p in prepared],
        targets=[p.targets for p in prepared],
        methods=[args.method] * len(prepared),
    )
    inputs = batch_inputs(model, job, model.device, normaliser(model, model.device))
    try:
        report = run_sanity(
            model,
            inputs,
            [str(p) for p in kept],
            chosen.layer,
            CascadeSettings(
                method=args.method, target=chosen.targets[0], seed=args.seed, depth=args.depth
            ),
        )
    except NothingToCompare as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT
    print(report.table())
    print(report.verdict())
    out.mkdir(parents=True, exist_ok=True)
    draw_plot(report).save(out / "sanity.png")
    (out / "sanity.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print(f"wrote {out / 'sanity.png'} and {out / 'sanity.json'}", file=sys.stderr)
    return EXIT_INPUT if failures else EXIT_OK


def image_paths(names: list[str], limit: int) -> list[Path]:
    """The images of ``names`` (``inputs.image_files``), the first ``limit``; ``Usage``
    if there is none."""
    try:
        paths = [path for _, path in image_files(names)]
    except NoSuchInput as error:
        raise Usage(str(error)) from None
    if not paths:
        raise Usage(f"no image files in {', '.join(names)}")
    return paths[:limit]


def _prepare(paths: list[Path], chosen: OfflinePlan) -> tuple[list[Path], list[PreparedImage], int]:
    """The images that could be read, and how many could not (each told on stderr)."""
    from service.contract.errors import ServiceError

    kept: list[Path] = []
    prepared: list[PreparedImage] = []
    failures = 0
    for i, path in enumerate(paths):
        try:
            prepared.append(prepare_file(chosen, path.read_bytes(), i))
        except (OSError, ServiceError) as error:
            print(f"error: {wording.about_file(path, error)}", file=sys.stderr)
            failures += 1
            continue
        kept.append(path)
    return kept, prepared, failures
