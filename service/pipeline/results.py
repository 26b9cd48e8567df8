"""An engine's answer as the response models: predictions, heatmaps in the requested
format and size (arrays, PNG, overlays), DICOM objects (Secondary Capture, Parametric
Map, Segmentation) and the DICOM SR report of each image."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.contract.requests import HeatmapOptions
from service.contract.responses import (
    DicomObject,
    DicomUids,
    Explanation,
    Geometry,
    Heatmap,
    ImageResult,
    Picture,
    Prediction,
)
from service.contract.terms import DICOM_FORMATS, ReportFormat
from service.imaging import dicom_seg, dicom_sr
from service.imaging.dicom_codes import Explained
from service.imaging.dicom_out import (
    PM_SOP_CLASS_UID,
    SC_SOP_CLASS_UID,
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
)
from service.imaging.source_header import DerivedObjectImpossible, missing_uids
from service.imaging.values import to_uint8
from service.logs import log_failure
from service.pipeline.engine_call import ExplainedImage
from service.pipeline.faithfulness import faithfulness
from service.pipeline.images import PreparedImage
from service.transport.interface import ModelInfo

logger = logging.getLogger(__name__)


def prediction(model: ModelInfo, index: int, scores: np.ndarray) -> Prediction:
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
        pixels = to_uint8(pixels)
    view = np.empty((*pixels.shape[:2], 3), dtype=np.uint8)
    if prepared.box is not None:
        mean = np.broadcast_to(np.asarray(model.mean, dtype=np.float64), (3,))
        view[...] = to_uint8(mean)
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
    heat: np.ndarray | None = None,
) -> Heatmap:
    """One heatmap of the response (``values`` stay a numpy array for orjson); ``heat``,
    if given, is the map already drawn at ``options.size``. A ``dicom-seg`` heatmap is
    only its size here: its segment is set with the image's Segmentation."""
    height, width = output_shape(cam, prepared.geometry, options.size)
    out = Heatmap(format=options.format, width=width, height=height, raw_max=float(cam.max()))
    if options.format == "none":
        return out
    if options.format in DICOM_FORMATS:
        reason = dicom_problem(prepared, options.format)
        if reason is not None:
            out.reason = reason  # (set only when there is one: a set field is written)
            return out
        if options.format == "dicom-seg":
            return out
    if heat is None:
        heat = heatmap(cam, prepared.geometry, options.size)
    if options.format in DICOM_FORMATS:
        assert prepared.source is not None and derived is not None
        source, header = prepared.source, prepared.source.header
        if options.format == "dicom-pm":
            data, reason = build_object(
                prepared.index, "dicom-pm", lambda: parametric_map(source, heat, derived)
            )
        else:
            overlay = draw_heatmap(
                heat, prepared, options.model_copy(update={"format": "overlay"}), model
            )
            data, reason = build_object(
                prepared.index,
                "dicom-sc",
                lambda: secondary_capture(source, overlay, derived, options.encoding),
            )
        if data is None:
            out.reason = reason
            return out
        out.data = encoded(data)
        out.uids = DicomUids(
            study=str(header.StudyInstanceUID),
            series=derived.series_uid,
            instance=derived.instance_uid,
        )
    elif options.format == "array":
        out.values = heat
    else:
        picture = draw_heatmap(heat, prepared, options, model)
        out.encoding = options.encoding
        out.data = encoded(encode_image(picture, options.encoding))
    return out


def build_object(index: int, what: str, build: Callable[[], bytes]) -> tuple[bytes | None, str]:
    """``build()``'s DICOM object, or None and the reason it cannot be made."""
    try:
        return build(), ""
    except DerivedObjectImpossible as impossible:
        return None, str(impossible)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        # The header came from the client: what it holds must not become a 500. The
        # type and place are logged, never the text (it may quote header values).
        log_failure(logger, f"image {index}: {what} not made", error, logging.WARNING)
        return None, (
            f"the source's DICOM header could not be carried into a {what} object "
            f"({type(error).__name__})"
        )


def _not_dicom(prepared: PreparedImage, what: str) -> str | None:
    """Why no DICOM object derived from this image can be made at all, or None."""
    if prepared.source is None:
        return (
            f"{what} is a DICOM object derived from a DICOM source image; image "
            f"{prepared.index} is not DICOM (ask for 'overlay' or 'png')"
        )
    return missing_uids(prepared.source.header)


def dicom_problem(prepared: PreparedImage, fmt: str) -> str | None:
    """Why ``fmt`` cannot be made for this image (the explanation says so), or None."""
    reason = _not_dicom(prepared, fmt)
    if reason is not None or prepared.source is None:
        return reason
    if fmt == "dicom-pm":
        return parametric_map_problem(prepared.source.header)
    if fmt == "dicom-seg":
        return dicom_seg.segmentation_problem(prepared.source.header, prepared.frame)
    return None


def _segmentation(
    prepared: PreparedImage,
    segments: Sequence[dicom_seg.Segment],
    how: Explained,
    explanations: Sequence[Explanation],
) -> DicomObject:
    """The image's Segmentation (one segment per explanation, in their order); each
    heatmap gets its segment number, or the reason."""
    reason = dicom_problem(prepared, "dicom-seg")
    if reason is not None:
        return segmentation_answer(None, reason, None, explanations)
    assert prepared.source is not None
    source, header = prepared.source, prepared.source.header
    series, instance = new_uid(), new_uid()
    data, reason = build_object(
        prepared.index,
        "dicom-seg",
        lambda: dicom_seg.segmentation(source, segments, how, series, instance),
    )
    uids = DicomUids(study=str(header.StudyInstanceUID), series=series, instance=instance)
    return segmentation_answer(data, reason, uids, explanations)


def segmentation_answer(
    data: bytes | None,
    reason: str,
    uids: DicomUids | None,
    explanations: Sequence[Explanation],
) -> DicomObject:
    """A Segmentation as the answer carries it (an image's or a volume's): its object,
    each heatmap numbered as its segment; or, where none was made, the reason, which each
    heatmap also gives."""
    if data is not None and uids is not None:
        for number, explanation in enumerate(explanations, start=1):
            explanation.heatmap.segment = number
        return DicomObject(data=encoded(data), uids=uids)
    for explanation in explanations:
        explanation.heatmap.reason = reason
    return DicomObject(reason=reason)


def _made_with(answer: ImageResult) -> list[dicom_sr.MadeObject]:
    """The DICOM objects of ``answer`` (for its report to name)."""
    made = []
    for explanation in answer.explanations:
        heat = explanation.heatmap
        if heat.data is not None and heat.uids is not None:
            sop_class = SC_SOP_CLASS_UID if heat.format == "dicom-sc" else PM_SOP_CLASS_UID
            made.append(dicom_sr.MadeObject(sop_class, heat.uids.series, heat.uids.instance))
    segmentation = answer.segmentation
    if segmentation is not None and segmentation.uids is not None:
        made.append(
            dicom_sr.MadeObject(
                dicom_seg.SOP_CLASS_UID, segmentation.uids.series, segmentation.uids.instance
            )
        )
    return made


def _report(
    prepared: PreparedImage,
    findings: Sequence[dicom_sr.Finding],
    how: Explained,
    made: Sequence[dicom_sr.MadeObject],
) -> DicomObject:
    """The image's DICOM SR Measurement Report, or the reason it cannot be made."""
    reason = _not_dicom(prepared, "dicom-sr")
    if reason is not None:
        return DicomObject(reason=reason)
    assert prepared.source is not None
    source, header = prepared.source, prepared.source.header
    series, instance = new_uid(), new_uid()
    data, reason = build_object(
        prepared.index,
        "dicom-sr",
        lambda: dicom_sr.measurement_report(source, findings, how, made, series, instance),
    )
    if data is None:
        return DicomObject(reason=reason)
    return DicomObject(
        data=encoded(data),
        uids=DicomUids(study=str(header.StudyInstanceUID), series=series, instance=instance),
    )


def encoded(data: bytes) -> str:
    """A DICOM object or picture in base64, as the answer carries it."""
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class RenderOptions:
    """What a request asks of each image's result besides the engine's answer: its
    heatmaps' format and size, how many predictions, the extras (``include``), the
    method and layer the DICOM objects name, and a report."""

    heatmap: HeatmapOptions
    top_k: int = 5
    include: tuple[str, ...] = ()
    method: str = "gradcam"
    layer: str | None = None  # None: the model's default
    report: ReportFormat | None = None


@dataclass
class _Drawing:
    """One image's answer as it is drawn: its explanations so far, and what its
    Segmentation and report collect from each explanation's map at the source's size."""

    result: ExplainedImage
    model: ModelInfo
    render: RenderOptions
    how: Explained
    series_uid: str  # dicom-sc, dicom-pm: one new series per source image
    segmenting: bool
    reporting: bool
    explanations: list[Explanation] = field(default_factory=list)
    segments: list[dicom_seg.Segment] = field(default_factory=list)
    findings: list[dicom_sr.Finding] = field(default_factory=list)

    def explain(self, number: int, target: int, cam: np.ndarray) -> None:
        """Draw explanation ``number`` (from 0) of class ``target``."""
        prepared, model, options = self.result.prepared, self.model, self.render.heatmap
        label = model.labels[target]
        # The Segmentation and the report read the map at the source's own pixel grid:
        # drawn once, and shared with the heatmap when it is drawn at that size too.
        original = (
            heatmap(cam, prepared.geometry, "original")
            if self.segmenting or self.reporting
            else None
        )
        derived = DerivedFrom(
            label=label,
            method=self.how.method,
            layer=self.how.layer,
            model=model.name,
            instance_number=number + 1,
            series_uid=self.series_uid,
            instance_uid=new_uid() if self.series_uid else "",
        )
        drawn = render_heatmap(
            cam,
            prepared,
            options,
            model,
            derived,
            heat=original if options.size == "original" else None,
        )
        score = self.result.scores
        self.explanations.append(
            Explanation(target=prediction(model, target, score), heatmap=drawn)
        )
        if original is not None and self.segmenting:
            self.segments.append(dicom_seg.Segment(target, label, dicom_seg.mask_of(original)))
        if original is not None and self.reporting:
            peak = dicom_sr.peak_of(original)
            self.findings.append(dicom_sr.Finding(target, label, float(score[target]), peak))


def render_result(result: ExplainedImage, model: ModelInfo, render: RenderOptions) -> ImageResult:
    """One image's part of the answer: its top predictions, each explanation's heatmap as
    ``render.heatmap`` asks (array, picture or DICOM object; a reason instead where it
    cannot be made), its Segmentation and report, and the extras asked for."""
    prepared, options = result.prepared, render.heatmap
    drawing = _Drawing(
        result,
        model,
        render,
        Explained(
            method=render.method,
            layer=render.layer or model.default_layer,
            model=model.name,
            codes=model.codes,
        ),
        series_uid=new_uid() if options.format in ("dicom-sc", "dicom-pm") else "",
        segmenting=options.format == "dicom-seg" and dicom_problem(prepared, "dicom-seg") is None,
        reporting=render.report is not None and _not_dicom(prepared, "dicom-sr") is None,
    )
    for number, (target, cam) in enumerate(zip(result.targets, result.cams, strict=True)):
        drawing.explain(number, target, cam)  # one map at full size at a time
    geometry = prepared.geometry
    order = result.order[: min(render.top_k, model.num_classes)]
    answer = ImageResult(
        width=geometry.width,
        height=geometry.height,
        geometry=Geometry(
            resize=geometry.resize,
            input_width=geometry.input_width,
            input_height=geometry.input_height,
            box=list(geometry.box),
        ),
        predictions=[prediction(model, int(i), result.scores) for i in order],
        explanations=drawing.explanations,
    )
    if prepared.out_of_domain is not None:  # a field left out, not null, when it is inside
        answer.out_of_domain = prepared.out_of_domain
    for explanation, curves in zip(answer.explanations, result.curves, strict=False):
        explanation.faithfulness = faithfulness(curves)
    if options.format == "dicom-seg":
        answer.segmentation = _segmentation(
            prepared, drawing.segments, drawing.how, answer.explanations
        )
    if render.report is not None:
        answer.report = _report(prepared, drawing.findings, drawing.how, _made_with(answer))
    _add_extras(answer, prepared, model, render)
    return answer


def _add_extras(
    answer: ImageResult, prepared: PreparedImage, model: ModelInfo, render: RenderOptions
) -> None:
    """``include``: the picture the heatmaps are drawn over, a DICOM file's attributes."""
    if "image" in render.include:
        shape = (prepared.geometry.height, prepared.geometry.width)
        picture = overlay_base(prepared, "original", shape, model)
        encoding = render.heatmap.encoding
        answer.image = Picture(
            width=picture.width,
            height=picture.height,
            encoding=encoding,
            data=encoded(encode_image(np.asarray(picture), encoding)),
        )
    if "dicom" in render.include:
        answer.dicom = prepared.dicom


def base64_chars(result: ImageResult) -> int:
    """Characters of the encoded pictures (and DICOM objects) in one rendered result."""
    pictures = [e.heatmap.data or "" for e in result.explanations]
    pictures += [(made.data or "") for made in (result.segmentation, result.report) if made]
    return sum(map(len, pictures)) + (len(result.image.data) if result.image else 0)
