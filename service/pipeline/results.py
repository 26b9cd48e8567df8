"""An engine's answer as the response models: predictions, heatmaps in the requested
format and size (arrays, PNG, overlays), DICOM objects (Secondary Capture, Parametric
Map)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from service.contract.requests import HeatmapOptions
from service.contract.responses import (
    DicomUids,
    Explanation,
    Geometry,
    Heatmap,
    ImageResult,
    Picture,
    Prediction,
)
from service.contract.terms import DICOM_FORMATS
from service.imaging.dicom_out import (
    DerivedFrom,
    new_uid,
    parametric_map,
    parametric_map_problem,
    secondary_capture,
)
from service.imaging.encoders import encode_image
from service.imaging.render import (
    colour_image,
    heatmap,
    output_shape,
    overlay_image,
    to_uint8,
)
from service.imaging.source_header import DerivedObjectImpossible
from service.logs import log_failure
from service.pipeline.faithfulness import faithfulness
from service.pipeline.images import ExplainedImage, PreparedImage
from service.transport.interface import ModelInfo

logger = logging.getLogger(__name__)


def _prediction(model: ModelInfo, index: int, scores: np.ndarray) -> Prediction:
    return Prediction(index=index, label=model.labels[index], score=float(scores[index]))


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
) -> Heatmap:
    """One heatmap of the response (``values`` stay a numpy array for orjson)."""
    height, width = output_shape(cam, prepared.geometry, options.size)
    out = Heatmap(format=options.format, width=width, height=height, raw_max=float(cam.max()))
    if options.format == "none":
        return out
    if options.format in DICOM_FORMATS:
        reason = dicom_problem(prepared, options.format)
        if reason is not None:
            out.reason = reason
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
            out.reason = str(impossible)
            return out
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
            # The header came from the client: what it holds must not become a 500. The
            # type and place are logged, never the text (it may quote header values).
            log_failure(
                logger, f"image {prepared.index}: {options.format} not made", error, logging.WARNING
            )
            out.reason = (
                f"the source's DICOM header could not be carried into a "
                f"{options.format} object ({type(error).__name__})"
            )
            return out
        out.data = _b64(data)
        out.uids = DicomUids(
            study=str(prepared.header.StudyInstanceUID),
            series=derived.series_uid,
            instance=derived.instance_uid,
        )
    elif options.format == "array":
        out.values = heat
    else:
        picture = draw_heatmap(heat, prepared, options, model)
        out.encoding = options.encoding
        out.data = _b64(encode_image(picture, options.encoding))
    return out


def dicom_problem(prepared: PreparedImage, fmt: str) -> str | None:
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
) -> ImageResult:
    geometry = result.prepared.geometry
    # DICOM objects: one new series per source image, one instance per explanation.
    series_uid = new_uid() if options.format in DICOM_FORMATS else ""
    order = result.order[: min(top_k, model.num_classes)]
    answer = ImageResult(
        width=geometry.width,
        height=geometry.height,
        geometry=Geometry(
            resize=geometry.resize,
            input_width=geometry.input_width,
            input_height=geometry.input_height,
            box=list(geometry.box),
        ),
        predictions=[_prediction(model, int(i), result.scores) for i in order],
        explanations=[
            Explanation(
                target=_prediction(model, target, result.scores),
                heatmap=render_heatmap(
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
            )
            for k, (target, cam) in enumerate(zip(result.targets, result.cams, strict=True))
        ],
    )
    for explanation, curves in zip(answer.explanations, result.curves, strict=False):
        explanation.faithfulness = faithfulness(curves)
    if "image" in include:
        picture = overlay_base(
            result.prepared, "original", (geometry.height, geometry.width), model
        )
        answer.image = Picture(
            width=picture.width,
            height=picture.height,
            encoding=options.encoding,
            data=_b64(encode_image(np.asarray(picture), options.encoding)),
        )
    if "dicom" in include:
        answer.dicom = result.prepared.dicom
    return answer


def base64_chars(result: ImageResult) -> int:
    """Characters of the encoded pictures (and DICOM objects) in one rendered result."""
    pictures = [e.heatmap.data or "" for e in result.explanations]
    return sum(map(len, pictures)) + (len(result.image.data) if result.image else 0)
