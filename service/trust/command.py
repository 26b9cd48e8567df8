"""``gradcam-service sanity --images DIR|FILE... [--out DIR]``: the model-parameter
randomisation test (``sanity.py``) on image files, as a table on stdout, ``sanity.png``
and ``sanity.json``.

Images take the API's way to the model input (``prepare_image``: decode, fit, the
per-image limits; ``batch_inputs``: normalised on the device). The model is loaded as
the models file describes it (``load_model``: float32, batch norms unfolded, no
server tuning): the check is about the weights, not about how fast they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from service.contract.errors import ServiceError
from service.contract.requests import HeatmapOptions
from service.contract.settings import Settings
from service.contract.suggestions import close_matches, did_you_mean
from service.engine.batch_inputs import batch_inputs, normaliser
from service.engine.loading.models import LoadedModel, load_model
from service.engine.runtime import choose_device
from service.explain_files import OutputExists, Usage, target_ref
from service.pipeline.budgets import RequestBudget
from service.pipeline.images import PreparedImage, prepare_image
from service.transport.interface import Job
from service.trust.inputs import NoSuchInput, image_files
from service.trust.plot import draw_plot
from service.trust.sanity import NothingToCompare, run_sanity

OUTPUTS = ("sanity.png", "sanity.json")


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


def _check_outputs(out: Path, force: bool) -> None:
    for name in OUTPUTS:
        if (out / name).exists() and not force:
            raise OutputExists(f"{out / name} exists (--force overwrites, or choose another --out)")


def _model(args: argparse.Namespace) -> tuple[LoadedModel, Settings]:
    settings = Settings.from_env(models_file=args.models, device=args.device)
    config = settings.models_config()
    name = args.model or config.default_model
    if name not in config.models:
        close = close_matches(name, list(config.models))
        raise Usage(
            f"there is no model '{name}'.{did_you_mean(close)} "
            f"Models: {', '.join(sorted(config.models))}."
        )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return load_model(name, config, choose_device(settings.device)), settings


def _layer(model: LoadedModel, layer: str | None) -> str:
    if layer is None:
        return model.default_layer
    names = [info.name for info in model.layers]
    if layer not in names:
        raise Usage(
            f"model '{model.name}' has no layer '{layer}' that gives an (N, C, H, W) map"
            f".{did_you_mean(close_matches(layer, names))} "
            "'gradcam-service layers' lists them."
        )
    return layer


def _target(model: LoadedModel, text: str | None) -> int | None:
    if text is None:
        return None
    ref = target_ref(text)
    if isinstance(ref, int):
        if not 0 <= ref < model.num_classes:
            raise Usage(f"class {ref} is outside 0..{model.num_classes - 1}")
        return ref
    if ref not in model.labels:
        close = close_matches(ref, model.labels)
        raise Usage(f"model '{model.name}' has no class '{ref}'.{did_you_mean(close)}")
    return model.labels.index(ref)


def _prepare(
    paths: list[Path], model: LoadedModel, layer: str, settings: Settings
) -> tuple[list[Path], list[PreparedImage], int]:
    """The images that could be read, and how many could not (each told on stderr)."""
    info = model.info()
    options = HeatmapOptions(format="none", size="original")
    kept: list[Path] = []
    prepared: list[PreparedImage] = []
    failures = 0
    for i, path in enumerate(paths):
        try:
            # Each file is its own request: the per-image limits apply, not a total.
            budget = RequestBudget(settings, info, layer, options)
            admit = partial(budget.admit_image, i, explanations=1)
            prepared.append(prepare_image(path.read_bytes(), i, info, admit, [None]))
            kept.append(path)
        except (OSError, ServiceError) as error:
            message = error.message if isinstance(error, ServiceError) else error.strerror
            print(f"error: {path}: {message}", file=sys.stderr)
            failures += 1
    return kept, prepared, failures


def sanity(args: argparse.Namespace) -> int:
    """Run the check; the number of inputs that could not be read (each told on stderr).
    Raises ``Usage``, ``OutputExists`` or ``ConfigError`` before any work."""
    if args.max_images < 1:
        raise Usage("--max-images must be at least 1")
    if args.depth is not None and args.depth < 1:
        raise Usage("--depth must be at least 1")
    out = Path(args.out)
    _check_outputs(out, args.force)
    paths = image_paths(args.images, args.max_images)
    model, settings = _model(args)
    layer = _layer(model, args.layer)
    target = _target(model, args.target)
    kept, prepared, failures = _prepare(paths, model, layer, settings)
    if not prepared:
        print("error: no image could be read: nothing to check", file=sys.stderr)
        return failures
    job = Job(
        model=model.name,
        layer=layer,
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
            layer,
            method=args.method,
            target=target,
            seed=args.seed,
            depth=args.depth,
        )
    except NothingToCompare as error:
        print(f"error: {error}", file=sys.stderr)
        return max(1, failures)
    print(report.table())
    print(report.verdict())
    out.mkdir(parents=True, exist_ok=True)
    draw_plot(report).save(out / "sanity.png")
    (out / "sanity.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print(f"wrote {out / 'sanity.png'} and {out / 'sanity.json'}", file=sys.stderr)
    return failures
