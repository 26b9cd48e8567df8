"""The one explain path: ``ExplainRequest`` → response JSON, shared by CLI and HTTP.

Stages (README, "Architecture"): validate the request as a whole, then each image (decode,
fit to the model input, resolve its targets) *before* any compute, so a batch
never fails because of one bad image; one engine call for the batch; then
render each result in the requested format and size.

No torch here: the engine is an ``interface.Engine`` (the engine process over
its socket for the HTTP workers, an in-process ``Runtime`` for the CLI), and
everything this module does to images is numpy and Pillow.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from PIL import Image

from service import metrics
from service.contract.errors import (
    ClientClosed,
    DeadlineExceeded,
    ErrorCode,
    InvalidField,
    PayloadTooLarge,
)
from service.contract.schemas import (
    DICOM_FORMATS,
    ClassRef,
    DicomWebImage,
    ExplainRequest,
    HeatmapOptions,
    TargetSpec,
)
from service.contract.settings import Settings
from service.imaging.decoding import Admit, decode_base64, decode_image
from service.imaging.dicom import describe_dicom, is_dicom, read_header
from service.imaging.dicom_out import (
    DerivedFrom,
    DerivedObjectImpossible,
    new_uid,
    parametric_map,
    parametric_map_problem,
    secondary_capture,
)
from service.imaging.encoders import encode_image
from service.imaging.geometry import Geometry, to_model_pixels
from service.imaging.render import (
    colour_image,
    heatmap,
    output_shape,
    overlay_image,
    to_rgb_image,
    to_uint8,
)
from service.logs import log_failure
from service.memory import RequestMemory
from service.pipeline.budgets import RequestBudget
from service.pipeline.dicomweb import DicomWebServers, InstanceRef, fetch_instance, store
from service.transport.interface import Box, Engine, Job, ModelInfo, class_order

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedImage:
    """One image, decoded and fitted to the model, with its targets resolved."""

    index: int
    # The image as displayed (EXIF orientation applied) in 8 bits, mode L or RGB;
    # kept only where a picture is drawn over it at its own size.
    display: Image.Image | None
    pixels: np.ndarray  # (H_in, W_in, 1 or 3) uint8, or float32 in [0, 1]
    box: Box | None  # where the image lies on the input, if not all of it
    geometry: Geometry
    targets: list[int | None]  # None = the top-1 class
    dicom: dict[str, Any] | None = None  # a DICOM file's attributes, when asked for
    header: Dataset | None = None  # a DICOM source's header, for dicom-sc/dicom-pm output
    frame: int | None = None  # the frame explained (multi-frame sources)


@dataclass(frozen=True)
class ExplainedImage:
    prepared: PreparedImage
    scores: np.ndarray  # (K,) probabilities (softmax) or sigmoid scores (multilabel)
    order: np.ndarray  # (K,) class indices, most likely first (interface.class_order)
    targets: list[int]
    cams: list[np.ndarray]  # (h, w) raw maps, one per target


def _class_index(ref: ClassRef, model: ModelInfo, index: int) -> int:
    field = f"targets[{index}]"
    if isinstance(ref, str):
        found = model.class_index(ref)
        if found is None:
            shown = ", ".join(model.labels[:20]) + (", ..." if model.num_classes > 20 else "")
            raise InvalidField(
                f"Image {index}: model '{model.name}' has no class '{ref}'. Its labels: {shown}.",
                code=ErrorCode.UNKNOWN_LABEL,
                image=index,
                field=field,
            )
        return found
    if not 0 <= ref < model.num_classes:
        raise InvalidField(
            f"Image {index}: class index {ref} is outside 0..{model.num_classes - 1}"
            f" for model '{model.name}'.",
            code=ErrorCode.TARGET_OUT_OF_RANGE,
            image=index,
            field=field,
        )
    return ref


def resolve_targets(spec: TargetSpec, model: ModelInfo, index: int) -> list[int | None]:
    """The distinct classes to explain for one image, in the order given."""
    if spec is None:
        return [None]
    refs = spec if isinstance(spec, list) else [spec]
    return list(dict.fromkeys(_class_index(ref, model, index) for ref in refs))


def prepare_image(
    data: bytes,
    index: int,
    model: ModelInfo,
    admit: Admit,
    targets: list[int | None],
    frame: int | None = None,
    keep_display: bool = False,
    describe: bool = False,
    keep_header: bool = False,
) -> PreparedImage:
    """Decode and fit one image; every problem raises a ``ServiceError`` naming ``index``.

    ``admit(width, height)`` checks the size from the header first (``budgets.py``);
    ``describe`` reads a DICOM file's attributes too.
    """
    # Overlays are drawn on the colour original, even for a 1-channel model.
    colour = keep_display and model.channels == 1
    image = decode_image(data, index, 3 if colour else model.channels, admit, frame)
    # The full-size image leaves here as 8 bits, or not at all.
    display = to_rgb_image(image) if keep_display else None
    if colour and image.mode == "RGB":
        image = image.convert("L")  # as decode_image converts for a 1-channel model
    pixels, box, geometry = to_model_pixels(image, model.input_size, model.resize)
    # The header is read once, for the attributes shown and for derived DICOM objects.
    header = read_header(data) if (describe or keep_header) and is_dicom(data) else None
    dicom = describe_dicom(header, frame) if describe and header is not None else None
    return PreparedImage(
        index,
        display,
        pixels,
        box,
        geometry,
        targets,
        dicom,
        header if keep_header else None,
        frame,
    )


def choose_layer(model: ModelInfo, layer: str | None) -> str:
    """The requested layer if it can be explained, else the model's default."""
    if layer is None:
        return model.default_layer
    if layer in model.layer_names():
        return layer
    if layer not in model.modules:
        close = model.suggest_modules(layer)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidField(
            f"Model '{model.name}': the model has no layer '{layer}'.{hint}",
            code=ErrorCode.UNKNOWN_LAYER,
            field="layer",
        )
    raise InvalidField(
        f"Layer '{layer}' of model '{model.name}' does not return an (N, C, H, W) "
        "feature map exactly once per forward pass; GET the model's layers for "
        "the ones that do.",
        code=ErrorCode.UNSUPPORTED_LAYER,
        field="layer",
    )


def run(
    engine: Engine,
    model: ModelInfo,
    layer: str,
    method: str,
    prepared: Sequence[PreparedImage],
    deadline: float,
    disconnected: Callable[[], bool] | None = None,
) -> list[ExplainedImage]:
    """One engine call for all ``prepared`` images (batched there with other requests)."""
    job = Job(
        model=model.name,
        layer=layer,
        images=[p.pixels for p in prepared],
        boxes=[p.box for p in prepared],
        targets=[p.targets for p in prepared],
        methods=[method] * len(prepared),
    )
    result = engine.run(job, deadline, disconnected)
    return [
        ExplainedImage(
            p, result.scores[i], class_order(result.logits[i]), result.targets[i], result.maps[i]
        )
        for i, p in enumerate(prepared)
    ]


def _prediction(model: ModelInfo, index: int, scores: np.ndarray) -> dict[str, Any]:
    return {"index": index, "label": model.labels[index], "score": float(scores[index])}


def overlay_base(
    prepared: PreparedImage, size: str, shape: tuple[int, int], model: ModelInfo
) -> Image.Image:
    """The image under an overlay of ``size`` (``shape`` = (H, W)), in RGB."""
    if size == "original":
        if prepared.display is None:
            raise ValueError("the image was prepared without its display copy")
        return prepared.display
    # What the model saw: its input pixels, with the model's mean where letterboxing
    # left no image (the colour those areas normalise to zero from).
    pixels = prepared.pixels
    if pixels.dtype != np.uint8:
        pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    view = np.empty((*pixels.shape[:2], 3), dtype=np.uint8)
    if prepared.box is not None:
        mean = np.broadcast_to(np.asarray(model.mean, dtype=np.float64), (3,))
        view[...] = np.round(np.clip(mean, 0, 1) * 255).astype(np.uint8)
        x0, y0, x1, y1 = prepared.box
        view[y0:y1, x0:x1] = pixels[y0:y1, x0:x1]
    else:
        view[...] = pixels
    base = Image.fromarray(view)
    if base.size != (shape[1], shape[0]):
        base = base.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return base


def draw_heatmap(
    heat: np.ndarray, prepared: PreparedImage, options: HeatmapOptions, model: ModelInfo
) -> np.ndarray:
    """The picture of a ``png``, ``gray`` or ``overlay`` heatmap: ``(H, W[, 3]) uint8``."""
    levels = to_uint8(heat)
    if options.format == "gray":
        return levels
    if options.format == "png":
        return np.asarray(colour_image(levels))
    base = overlay_base(prepared, options.size, heat.shape, model)
    return np.asarray(overlay_image(base, levels))


def render_heatmap(
    cam: np.ndarray,
    prepared: PreparedImage,
    options: HeatmapOptions,
    model: ModelInfo,
    derived: DerivedFrom | None = None,
) -> dict[str, Any]:
    """One heatmap object of the response (``values`` stay a numpy array for orjson)."""
    height, width = output_shape(cam, prepared.geometry, options.size)
    out: dict[str, Any] = {
        "format": options.format,
        "width": width,
        "height": height,
        "raw_max": float(cam.max()),
    }
    if options.format == "none":
        return out
    if options.format in DICOM_FORMATS:
        reason = _dicom_problem(prepared, options.format)
        if reason is not None:
            out["reason"] = reason
            return out
    heat = heatmap(cam, prepared.geometry, options.size)
    if options.format in DICOM_FORMATS:
        assert prepared.header is not None and derived is not None
        try:
            if options.format == "dicom-pm":
                data = parametric_map(prepared.header, heat, derived)
            else:
                overlay = draw_heatmap(
                    heat, prepared, options.model_copy(update={"format": "overlay"}), model
                )
                data = secondary_capture(
                    prepared.header, overlay, derived, prepared.frame, options.encoding
                )
        except DerivedObjectImpossible as impossible:
            out["reason"] = str(impossible)
            return out
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
            # The header came from the client: what it holds must not become a 500. The
            # type and place are logged, never the text (it may quote header values).
            log_failure(
                logger, f"image {prepared.index}: {options.format} not made", error, logging.WARNING
            )
            out["reason"] = (
                f"the source's DICOM header could not be carried into a "
                f"{options.format} object ({type(error).__name__})"
            )
            return out
        out["data"] = _b64(data)
        out["uids"] = {
            "study": str(prepared.header.StudyInstanceUID),
            "series": derived.series_uid,
            "instance": derived.instance_uid,
        }
    elif options.format == "array":
        out["values"] = heat
    else:
        picture = draw_heatmap(heat, prepared, options, model)
        out["encoding"] = options.encoding
        out["data"] = _b64(encode_image(picture, options.encoding))
    return out


def _dicom_problem(prepared: PreparedImage, fmt: str) -> str | None:
    """Why ``fmt`` cannot be made for this image (the explanation says so), or None."""
    if prepared.header is None:
        return (
            f"{fmt} is a DICOM object derived from a DICOM source image; image "
            f"{prepared.index} is not DICOM (ask for 'overlay' or 'png')"
        )
    if fmt == "dicom-pm":
        return parametric_map_problem(prepared.header)
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_result(
    result: ExplainedImage,
    model: ModelInfo,
    top_k: int,
    options: HeatmapOptions,
    include: Sequence[str] = (),
    method: str = "gradcam",
    layer: str | None = None,
) -> dict[str, Any]:
    geometry = result.prepared.geometry
    # DICOM objects: one new series per source image, one instance per explanation.
    series_uid = new_uid() if options.format in DICOM_FORMATS else ""
    order = result.order[: min(top_k, model.num_classes)]
    extras: dict[str, Any] = {}
    if "image" in include:
        picture = overlay_base(
            result.prepared, "original", (geometry.height, geometry.width), model
        )
        extras["image"] = {
            "width": picture.width,
            "height": picture.height,
            "encoding": options.encoding,
            "data": _b64(encode_image(np.asarray(picture), options.encoding)),
        }
    if "dicom" in include:
        extras["dicom"] = result.prepared.dicom
    return {
        "width": geometry.width,
        "height": geometry.height,
        "geometry": {
            "resize": geometry.resize,
            "input_width": geometry.input_width,
            "input_height": geometry.input_height,
            "box": list(geometry.box),
        },
        "predictions": [_prediction(model, int(i), result.scores) for i in order],
        "explanations": [
            {
                "target": _prediction(model, target, result.scores),
                "heatmap": render_heatmap(
                    cam,
                    result.prepared,
                    options,
                    model,
                    DerivedFrom(
                        label=model.labels[target],
                        method=method,
                        layer=layer or model.default_layer,
                        model=model.name,
                        instance_number=k + 1,
                        series_uid=series_uid,
                        instance_uid=new_uid() if series_uid else "",
                    ),
                ),
            }
            for k, (target, cam) in enumerate(zip(result.targets, result.cams, strict=True))
        ],
        **extras,
    }


def explain(
    request: ExplainRequest,
    engine: Engine,
    limits: Settings,
    disconnected: Callable[[], bool] | None = None,
    started: float | None = None,
    memory: RequestMemory | None = None,
    body_bytes: int = 0,
) -> dict[str, Any]:
    """The response body for ``request`` (see ``schemas.ExplainResponse``).

    ``disconnected`` tells whether the client has gone; a request whose client
    left is not computed. The deadline is ``limits.request_timeout_s`` after
    ``started`` (``time.monotonic()``; default now). ``memory``, if given, reserves
    the request's estimated cost (its body was ``body_bytes``) image by image.
    """
    deadline = (started if started is not None else time.monotonic()) + limits.request_timeout_s
    if len(request.images) > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"The request has {len(request.images)} images; the limit is "
            f"{limits.max_images_per_request}.",
            code=ErrorCode.TOO_MANY_IMAGES,
            field="images",
        )
    if request.targets is not None and len(request.targets) != len(request.images):
        raise InvalidField(
            f"The targets list has {len(request.targets)} entries for "
            f"{len(request.images)} images; give one per image (null for the "
            "top-1 class).",
            code=ErrorCode.TARGETS_LENGTH,
            field="targets",
        )
    frames = _frames(request)
    model = engine.catalog().get(request.model)
    layer = choose_layer(model, request.layer)
    specs: list[TargetSpec] = list(request.targets or [None] * len(request.images))
    targets = [resolve_targets(spec, model, i) for i, spec in enumerate(specs)]
    keep_display = (
        "image" in request.include
        or request.heatmap.format == "dicom-sc"
        or (request.heatmap.format == "overlay" and request.heatmap.size == "original")
    )
    budget = RequestBudget(
        limits,
        model,
        layer,
        request.heatmap,
        with_image="image" in request.include,
        keeps_display=keep_display,
        memory=memory,
        body_bytes=body_bytes,
    )
    budget.check_explanations([len(t) for t in targets])
    servers = DicomWebServers(limits.dicomweb_servers)
    if request.store is not None:
        servers.base(request.store.url, "store.url", "The store URL")  # before any work

    def image_bytes(given: str | DicomWebImage, index: int) -> bytes:
        if isinstance(given, str):
            return decode_base64(given, index)
        ref = given.dicomweb
        return fetch_instance(
            InstanceRef(ref.url, ref.study, ref.series, ref.instance),
            servers,
            index,
            limits.max_request_bytes,
            deadline - time.monotonic(),
        )

    with metrics.STAGE_DURATION.labels("decode").time():
        prepared = [
            prepare_image(
                image_bytes(text, i),
                i,
                model,
                partial(budget.admit_image, i, explanations=len(targets[i])),
                targets[i],
                frames[i],
                keep_display,
                describe="dicom" in request.include,
                keep_header=request.heatmap.format in DICOM_FORMATS,
            )
            for i, text in enumerate(request.images)
        ]
    results = run(engine, model, layer, request.method, prepared, deadline, disconnected)
    metrics.IMAGES_EXPLAINED.labels(model.name).inc(len(results))
    rendered = []
    with metrics.STAGE_DURATION.labels("render").time():
        for result in results:
            # Big pictures take a while each: stop between them for a client that
            # left or a deadline that passed.
            if time.monotonic() > deadline:
                raise DeadlineExceeded("The request took longer than its deadline.")
            if disconnected is not None and disconnected():
                raise ClientClosed("The client disconnected before the answer was drawn.")
            rendered.append(
                render_result(
                    result,
                    model,
                    request.top_k,
                    request.heatmap,
                    request.include,
                    request.method,
                    layer,
                )
            )
            budget.pictures_encoded(result.prepared.index, _base64_chars(rendered[-1]))
    if request.store is not None:
        _store(rendered, request.store.url, servers, deadline)
    return {
        "model": model.name,
        "method": request.method,
        "layer": layer,
        "precision": model.precision,
        "results": rendered,
    }


def _store(
    rendered: list[dict[str, Any]], url: str, servers: DicomWebServers, deadline: float
) -> None:
    """STOW-RS every DICOM object of the answer to ``url``; each heatmap says how it went."""
    made = [
        explanation["heatmap"]
        for result in rendered
        for explanation in result["explanations"]
        if "data" in explanation["heatmap"]
    ]
    if not made:
        return
    objects = [(h["uids"]["instance"], base64.b64decode(h["data"])) for h in made]
    for picture, outcome in zip(
        made, store(objects, url, servers, deadline - time.monotonic()), strict=True
    ):
        picture["stored"] = {"ok": outcome.ok, "message": outcome.message}


def _base64_chars(result: dict[str, Any]) -> int:
    """Characters of the encoded pictures (and DICOM objects) in one rendered result."""
    pictures = [e["heatmap"].get("data", "") for e in result["explanations"]]
    return sum(map(len, pictures)) + len(result.get("image", {}).get("data", ""))


def _frames(request: ExplainRequest) -> list[int | None]:
    """The frame of each image: ``frame`` given once for all, or one per image."""
    if not isinstance(request.frame, list):
        return [request.frame] * len(request.images)
    if len(request.frame) != len(request.images):
        raise InvalidField(
            f"The frame list has {len(request.frame)} entries for "
            f"{len(request.images)} images; give one per image (null for the "
            "default) or one number for all.",
            code=ErrorCode.FRAMES_LENGTH,
            field="frame",
        )
    return list(request.frame)


def dumps(body: dict[str, Any]) -> bytes:
    """Serialise a response; heatmap arrays go straight from numpy (orjson)."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
