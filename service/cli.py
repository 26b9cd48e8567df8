"""``gradcam-service``: serve the HTTP API, explain images, list layers.

    gradcam-service serve [--port P] [--workers N]   the HTTP API on gunicorn
    gradcam-service explain IMAGE... [--out DIR]     overlay + heatmap PNGs per image (+ SR)
    gradcam-service explain --request BODY.json      the exact JSON the HTTP API returns
    gradcam-service layers                           candidate target layers and shapes
    gradcam-service body IMAGE... [--target T]       a POST /v1/explain body, for curl & co.
    gradcam-service sanity --images DIR [--out DIR]  the maps after cascading randomisation
    gradcam-service audit --images DIR --out DIR     where the model looks over a dataset

Exit codes (``EXIT_*``): 0 done; 1 some inputs (or the request) got an error, each
told on one line, the others done; 2 bad usage, settings or models file, nothing
done; 3 an output file exists (``--force`` overwrites); 70 an internal failure
(one line; ``-v`` adds the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from service import package_version
from service.contract.errors import ConfigError, ServiceError
from service.contract.requests import parse_explain_request
from service.contract.responses import to_json
from service.contract.settings import Device, Settings
from service.contract.suggestions import close_matches, did_you_mean
from service.contract.terms import (
    METHODS,
    HeatmapEncoding,
    HeatmapFormat,
    HeatmapSize,
    ReportFormat,
)
from service.explain_files import (
    FilePlan,
    OutputExists,
    Usage,
    explain_files,
    plan_files,
)
from service.pipeline.explain import explain
from service.request_body import BodyRefused, request_body
from service.server.security import AccessPolicy
from service.supervision.preflight import preflight

if TYPE_CHECKING:  # torch is imported only by the commands that run the model here
    from service.engine.runtime import Runtime

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_EXISTS, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130


def _runtime(args: argparse.Namespace) -> Runtime:
    """The engine in this process (``serve`` runs it in engine processes instead)."""
    from service.engine.runtime import Runtime

    settings = Settings.from_env(models_file=args.models, device=args.device)
    return Runtime(settings).start()


def _explain_request(args: argparse.Namespace, runtime: Runtime) -> int:
    body = Path(args.request).read_bytes() if args.request != "-" else sys.stdin.buffer.read()
    try:
        response = explain(parse_explain_request(body), runtime, runtime.settings)
    except ServiceError as error:
        sys.stdout.buffer.write(to_json(error.to_response()) + b"\n")
        return 1
    sys.stdout.buffer.write(to_json(response) + b"\n")
    return 0


_LAYOUT_WORDS = {"nhwc": "H×W×C", "tokens": "tokens"}


def _layers(args: argparse.Namespace, runtime: Runtime) -> int:
    model = runtime.catalog().get(args.model)
    print(
        f"model '{model.name}' ({model.arch}), input {model.channels}×"
        f"{model.input_size[0]}×{model.input_size[1]}; * = default layer"
    )
    width = max(len(layer.name) for layer in model.layers)
    for layer in model.layers:
        mark = "*" if layer.name == model.default_layer else " "
        # A transformer's layers: the grid's shape, and what it was made from.
        made_from = "" if layer.layout == "nchw" else f"  (from {_LAYOUT_WORDS[layer.layout]})"
        print(
            f"{mark} {layer.name:<{width}}  {layer.kind:<20} "
            f"{layer.channels}×{layer.height}×{layer.width}{made_from}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Become the supervisor of the engine process(es) and gunicorn (``supervisor``).

    exec() gives it a fresh interpreter, so that its metrics find their
    multiprocess folder (prometheus_client reads it at import) and nothing this
    command imported stays in memory.
    """
    overrides = {
        "models_file": args.models,
        "device": args.device,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "threads": args.threads,
        "engines": args.engines,
    }
    # A bad flag, variable, tokens file, models file, weights file, device or a port in
    # use stops here, with its name, before any process starts (preflight.py).
    settings = Settings.from_env(**overrides)
    AccessPolicy(settings)
    preflight(settings)
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is not None:
            env[f"GRADCAM_{name.upper()}"] = str(value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "service.supervision"], env)
    return 0  # not reached


def _body(args: argparse.Namespace) -> int:
    """Print (or write) a request body for image files (``request_body.py``)."""
    try:
        data = request_body(args)
    except BodyRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return EXIT_OK


def _sanity(args: argparse.Namespace) -> int:
    """The model-parameter randomisation test (``trust/command.py``); no runtime."""
    from service.trust.command import sanity

    try:
        failures = sanity(args)
    except (ConfigError, Usage, OutputExists, OSError) as error:
        return _told(error)
    return EXIT_INPUT if failures else EXIT_OK


def _told(error: ConfigError | Usage | OutputExists | OSError) -> int:
    """One line on stderr for a command that could not go on, and its exit code."""
    if isinstance(error, OSError):  # the output folder cannot be written, say
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return EXIT_INPUT
    print(f"error: {error}", file=sys.stderr)
    return EXIT_EXISTS if isinstance(error, OutputExists) else EXIT_USAGE


def _add_sanity(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    sanity_p = sub.add_parser(
        "sanity",
        help="check that the maps change when the model's layers are randomised, "
        "from the output down (Adebayo et al., 2018): table, sanity.png, sanity.json",
    )
    sanity_p.add_argument("--images", nargs="+", required=True, help="image folders and/or files")
    common(sanity_p)
    sanity_p.add_argument("--layer", help="target layer (dotted name); default: the model's")
    sanity_p.add_argument("--method", **_one_of(METHODS), default="gradcam")
    sanity_p.add_argument(
        "--target", help="class index or label to explain; default: each image's top-1 class"
    )
    sanity_p.add_argument("--out", default="sanity-out", help="folder for the PNG and JSON")
    sanity_p.add_argument("--max-images", type=int, default=32, help="default 32")
    sanity_p.add_argument("--seed", type=int, default=0, help="of the re-initialisation")
    sanity_p.add_argument(
        "--depth",
        type=int,
        help="randomise blocks: modules grouped by the first N parts of their names; "
        "default: one layer (with its norm) per step",
    )
    sanity_p.add_argument("--force", action="store_true", help="overwrite sanity.png/.json")


def _one_of(options: Sequence[str]) -> dict[str, Any]:
    """argparse keywords for a value from ``options``: a mistake names the close matches
    ("'gradcm' is not one of ...: did you mean 'gradcam'?"), which ``choices`` does not."""

    def parse(value: str) -> str:
        if value in options:
            return value
        raise argparse.ArgumentTypeError(
            f"'{value}' is not one of {', '.join(options)}."
            f"{did_you_mean(close_matches(value, options))}"
        )

    parse.__name__ = "value"  # argparse's "invalid value" if the message is lost
    return {"type": parse, "metavar": "{" + ",".join(options) + "}"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcam-service",
        description="Serve the HTTP API, explain images, list layers.",
        epilog="exit codes: 0 done; 1 some inputs got an error (each on one line), the others "
        "done; 2 bad usage, settings or models file; 3 an output file exists (--force); "
        "70 internal failure; 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", help="models file (TOML); default: the bundled demo model")
        p.add_argument("--model", help="model name; default: the models file's default")
        p.add_argument("--device", **_one_of(get_args(Device)), help="default: auto")
        p.add_argument("-v", "--verbose", action="store_true", help="log model loading")

    explain_p = sub.add_parser("explain", help="explain images (files or a JSON request)")
    explain_p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    explain_p.add_argument(
        "--request",
        help="a POST /v1/explain body (a file, or - for stdin); prints the JSON response",
    )
    common(explain_p)
    explain_p.add_argument("--layer", help="target layer (dotted name); default: the model's")
    explain_p.add_argument("--method", **_one_of(METHODS), default="gradcam")
    explain_p.add_argument(
        "--target",
        action="append",
        help="class index or label to explain (repeat for several); default: the top-1 class",
    )
    explain_p.add_argument("--top-k", type=int, default=5, help="predictions to print")
    explain_p.add_argument(
        "--faithfulness",
        action="store_true",
        help="print each explanation's deletion and insertion AUCs (docs/trust.md; "
        "39 more forward passes each)",
    )
    explain_p.add_argument("--out", default="gradcam-out", help="folder for the PNGs")
    explain_p.add_argument(
        "--frame",
        type=int,
        action="append",
        help="frame of multi-frame images (DICOM): once for every input, or "
        "repeated once per input; default: each file's own default",
    )
    explain_p.add_argument(
        "--force",
        action="store_true",
        help="overwrite output files that exist (default: stop, exit code 3)",
    )

    body_p = sub.add_parser(
        "body",
        help="print a POST /v1/explain body for image files "
        "(for curl --data-binary @file, locust, other clients)",
    )
    body_p.add_argument(
        "images", nargs="+", help="image files (PNG, JPEG, DICOM, ...; - reads one from stdin)"
    )
    body_p.add_argument("--model", help="model name; default: the server's default")
    body_p.add_argument(
        "--target",
        action="append",
        help="class index or label to explain for "
        "every image (repeat for several); default: the top-1 class",
    )
    body_p.add_argument("--method", **_one_of(METHODS))
    body_p.add_argument("--layer", help="target layer (dotted name); default: the model's")
    body_p.add_argument("--format", **_one_of(get_args(HeatmapFormat)), help="default png")
    body_p.add_argument("--size", **_one_of(get_args(HeatmapSize)), help="default original")
    body_p.add_argument("--encoding", **_one_of(get_args(HeatmapEncoding)), help="default png")
    body_p.add_argument(
        "--report",
        **_one_of(get_args(ReportFormat)),
        help="dicom-sr: a DICOM SR report of each DICOM image; default none",
    )
    body_p.add_argument("--top-k", type=int)
    body_p.add_argument("--frame", type=int, help="frame of multi-frame images")
    body_p.add_argument("-o", "--output", help="write the body here instead of stdout")

    layers_p = sub.add_parser("layers", help="list candidate target layers with output shapes")
    common(layers_p)

    _add_sanity(sub, common)

    serve_p = sub.add_parser("serve", help="run the HTTP API on gunicorn")
    common(serve_p)
    serve_p.add_argument(
        "--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in a container)"
    )
    serve_p.add_argument("--port", type=int, help="default 8000")
    serve_p.add_argument("--workers", type=int, help="HTTP worker processes; default: one per core")
    serve_p.add_argument("--threads", type=int, help="request threads per HTTP worker; default 16")
    serve_p.add_argument(
        "--engines", type=int, help="engine processes; default: one per GPU, or one on the CPU"
    )
    _add_audit(sub, common)
    return parser


def _add_audit(sub: Any, common: Any) -> None:
    audit_p = sub.add_parser(
        "audit",
        help="where a model looks over a dataset: report.json and report.html, "
        "flagging heatmaps outside their boxes or on the border (docs/trust.md)",
    )
    audit_p.add_argument(
        "--images", nargs="+", default=[], help="folders (searched recursively) and image files"
    )
    audit_p.add_argument(
        "--dicomweb",
        help="a file of DICOMweb studies to audit, one BASE/studies/STUDY-UID per line",
    )
    audit_p.add_argument(
        "--boxes", help="CSV image,label,x0,y0,x1,y1: where each image's evidence lies"
    )
    audit_p.add_argument("--out", required=True, help="folder for the log and the reports")
    common(audit_p)
    audit_p.add_argument("--layer", help="target layer (dotted name); default: the model's")
    audit_p.add_argument("--method", **_one_of(METHODS), default="gradcam")
    audit_p.add_argument("--target", help="class index or label to explain; default: top-1")
    audit_p.add_argument(
        "--faithfulness", action="store_true", help="deletion and insertion AUCs per image"
    )
    audit_p.add_argument("--max-outside", type=float, default=0.5, help="default 0.5")
    audit_p.add_argument("--max-border", type=float, default=0.5, help="default 0.5")
    audit_p.add_argument("--flag-share", type=float, default=0.25, help="default 0.25")
    audit_p.add_argument(
        "--min-score", type=float, default=0.5, help="judge only explanations scoring this much"
    )
    audit_p.add_argument(
        "--restart", action="store_true", help="start over instead of resuming in --out"
    )
    audit_p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _audit(args: argparse.Namespace) -> int:
    """``gradcam-service audit`` (``trust/audit.py``): inputs and boxes are checked before
    a model loads."""
    from service.trust.audit import AuditUsage, audit, dicomweb_inputs, find_inputs, read_boxes

    try:
        items = find_inputs(args.images)
        if args.dicomweb:
            items += dicomweb_inputs(Path(args.dicomweb), Settings.from_env().request_timeout_s)
        if not items:
            raise AuditUsage("nothing to audit: give --images or --dicomweb")
        if args.boxes:
            read_boxes(Path(args.boxes))
        runtime = _runtime(args)
        return EXIT_INPUT if audit(args, runtime, items) else EXIT_OK
    except (AuditUsage, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"interrupted; run the same command again to resume from {args.out}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit code (``EXIT_*``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "body":  # no model, no logging: just the JSON
        return _body(args)
    if args.command == "audit":
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
        return _audit(args)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "explain" and bool(args.request) == bool(args.images):
        parser.error("explain takes image files or --request, not both and not neither")
    try:
        return _command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line, not a traceback; -v for the traceback
        if verbose:
            logging.getLogger(__name__).exception("internal failure")
        print(
            f"error: internal failure: {type(error).__name__}: {error} (-v shows where)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _command(args: argparse.Namespace) -> int:
    plan: FilePlan | None = None
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "sanity":
            return _sanity(args)
        if args.command == "explain" and args.images:
            plan = plan_files(args)
        runtime = _runtime(args)
    except (ConfigError, Usage, OutputExists) as error:
        return _told(error)
    try:
        if args.command == "layers":
            return _layers(args, runtime)
        if plan is None:
            return _explain_request(args, runtime)
        return EXIT_INPUT if explain_files(args, runtime, plan) else EXIT_OK
    except OSError as error:
        return _told(error)
    except ServiceError as error:
        # Not one input's: the --model or --layer given (each input's errors are caught
        # where it is explained), so nothing was done.
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        runtime.close()


if __name__ == "__main__":
    sys.exit(main())
