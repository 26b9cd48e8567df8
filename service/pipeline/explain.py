"""The one explain path: ``ExplainRequest`` → response JSON, shared by CLI and HTTP.

Stages (docs/architecture.md): validate the request as a whole, then each image (decode,
fit to the model input, resolve its targets) *before* any compute, so a batch
never fails because of one bad image; one engine call for the batch; then
render each result in the requested format and size.

No torch here: the engine is an ``interface.Engine`` (the engine process over
its socket for the HTTP workers, an in-process ``Runtime`` for the CLI), and
everything this pipeline does to images is numpy and Pillow. The stages live in
``images.py`` (decode, fit, targets), ``engine_call.py`` (the engine call) and
``results.py`` (rendering, DICOM objects, JSON); this module runs them for one request,
within its ``RequestContext``, and stores the results.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from functools import partial

from service import metrics
from service.contract.errors import (
    ErrorCode,
    InvalidField,
    PayloadTooLarge,
)
from service.contract.requests import (
    DicomSeriesImage,
    DicomWebImage,
    ExplainRequest,
    TargetSpec,
)
from service.contract.responses import (
    DicomObject,
    ExplainResponse,
    Heatmap,
    ImageResult,
    StoreOutcome,
)
from service.contract.settings import Settings
from service.contract.terms import DICOM_FORMATS
from service.imaging.decoding import decode_base64, empty_image
from service.pipeline.budgets import RequestBudget
from service.pipeline.context import RequestContext
from service.pipeline.dicomweb import DicomWebServers, InstanceRef, fetch_dicomweb, store
from service.pipeline.engine_call import (
    ExplainedImage,
    ExplainedVolume,
    Explaining,
    call_engine,
)
from service.pipeline.images import (
    ImageSlot,
    Keep,
    choose_layer,
    prepare_image,
    resolve_targets,
)
from service.pipeline.results import RenderOptions, base64_chars, render_result
from service.pipeline.volume_budget import admit_volume, series_fetch_limit
from service.pipeline.volume_results import render_volume_result
from service.pipeline.volumes import VolumeSlot, check_request_kind, prepare_volume
from service.transport.interface import Engine, ModelInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Computed:
    """A request's images explained, before anything is drawn."""

    model: ModelInfo
    layer: str
    results: list[ExplainedImage]  # a 2-D model's images
    budget: RequestBudget
    servers: DicomWebServers
    volumes: list[ExplainedVolume] = field(default_factory=list)  # a volume model's


def explain(
    request: ExplainRequest,
    engine: Engine,
    settings: Settings,
    context: RequestContext | None = None,
) -> ExplainResponse:
    """The answer to ``request``, within ``context`` (its deadline, its client, its
    memory reservation; default: a request that arrives now, with no client to lose and
    no budget)."""
    context = context or RequestContext.start(settings)
    computed = compute(request, engine, settings, context)
    model, layer = computed.model, computed.layer
    options = RenderOptions(
        top_k=request.top_k,
        heatmap=request.heatmap,
        include=tuple(request.include),
        method=request.method,
        layer=layer,
        report=request.report,
    )
    drawn = [
        (result.prepared.index, partial(render_result, result, model, options))
        for result in computed.results
    ]
    drawn += [
        (v.prepared.index, partial(render_volume_result, v, model, options))
        for v in computed.volumes
    ]
    rendered: list[ImageResult] = []
    with metrics.STAGE_DURATION.labels("render").time():
        for index, draw in drawn:
            # Big pictures take a while each: stop between them for a client that
            # left or a deadline that passed.
            context.check_still_wanted()
            rendered.append(draw())
            computed.budget.pictures_encoded(index, base64_chars(rendered[-1]))
    if request.store is not None:
        with metrics.STAGE_DURATION.labels("store").time():
            _store(rendered, request.store.url, computed.servers, context)
    return ExplainResponse(
        model=model.name,
        method=request.method,
        layer=layer,
        precision=model.precision,
        results=rendered,
        random_weights=model.random_weights,
    )


def compute(
    request: ExplainRequest,
    engine: Engine,
    settings: Settings,
    context: RequestContext,
    arrays: bool | None = None,
) -> Computed:
    """Every stage before drawing: checks, decoding and fitting, the engine call. The
    protocol door (``protocol.py``) draws its own; ``arrays``: its maps also go out as
    numbers beside the format's pictures (the budget charges both)."""
    _check_lengths(request, settings)
    frames = _frames(request)
    model = engine.catalog().get(request.model)
    how = Explaining(
        model,
        choose_layer(model, request.layer),
        request.method,
        faithfulness="faithfulness" in request.include,
    )
    check_request_kind(request, model)
    specs: list[TargetSpec] = list(request.targets or [None] * len(request.images))
    targets = [resolve_targets(spec, model, i) for i, spec in enumerate(specs)]
    keep = _keep(request)
    budget = RequestBudget(
        settings,
        model,
        how.layer,
        request.heatmap,
        with_image="image" in request.include,
        keeps_display=keep.display,
        reports=request.report is not None,
        memory=context.memory,
        body_bytes=context.body_bytes,
        arrays=arrays,
    )
    budget.check_explanations([len(t) for t in targets], how.faithfulness)
    servers = DicomWebServers(settings.dicomweb_servers)
    if request.store is not None:
        servers.base(request.store.url, "store.url", "The store URL")  # before any work
    fetch = partial(_image_bytes, servers=servers, settings=settings, context=context)
    if model.is_volume:
        with metrics.STAGE_DURATION.labels("decode").time():
            volumes = [
                prepare_volume(
                    fetch(given, i),
                    VolumeSlot(i, targets[i], keep.display, settings.out_of_domain),
                    model,
                    partial(admit_volume, budget, i, explanations=len(targets[i])),
                )
                for i, given in enumerate(request.images)
            ]
        explained = call_engine(engine, how, volumes, context)
        metrics.IMAGES_EXPLAINED.labels(model.name).inc(len(explained))
        return Computed(model, how.layer, [], budget, servers, explained)
    with metrics.STAGE_DURATION.labels("decode").time():
        prepared = [
            prepare_image(
                one_file(fetch(given, i)),
                ImageSlot(i, targets[i], frames[i]),
                model,
                partial(budget.admit_image, i, explanations=len(targets[i])),
                keep,
                settings.out_of_domain,
            )
            for i, given in enumerate(request.images)
        ]
    results = call_engine(engine, how, prepared, context)
    metrics.IMAGES_EXPLAINED.labels(model.name).inc(len(results))
    return Computed(model, how.layer, results, budget, servers)


def one_file(data: bytes | list[bytes]) -> bytes:
    """An image's one file (``check_request_kind`` has refused series for 2-D models)."""
    assert isinstance(data, bytes)
    return data


def _check_lengths(request: ExplainRequest, settings: Settings) -> None:
    """The request's images within the limit, and one target entry per image."""
    if len(request.images) > settings.max_images_per_request:
        raise PayloadTooLarge(
            f"The request has {len(request.images)} images; the limit is "
            f"{settings.max_images_per_request}.",
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


def _keep(request: ExplainRequest) -> Keep:
    """What the answer needs of each image beyond its model input."""
    heatmap = request.heatmap
    return Keep(
        display=(
            "image" in request.include
            or heatmap.format == "dicom-sc"
            or (heatmap.format == "overlay" and heatmap.size == "original")
        ),
        attributes="dicom" in request.include,
        source=heatmap.format in DICOM_FORMATS or request.report is not None,
    )


def _image_bytes(
    given: str | DicomWebImage | DicomSeriesImage | bytes,
    index: int,
    *,
    servers: DicomWebServers,
    settings: Settings,
    context: RequestContext,
) -> bytes | list[bytes]:
    """An image's file: sent as base64, as the file itself (the raw-image and form doors),
    or fetched from a DICOMweb server (WADO-RS); a series' files (a volume), sent or
    fetched whole."""
    if isinstance(given, str):
        return decode_base64(given, index)
    if isinstance(given, bytes):
        if not given:
            raise empty_image(index)
        return given
    if isinstance(given, DicomSeriesImage):
        return [decode_base64(instance, index) for instance in given.series]
    ref = given.dicomweb
    with metrics.STAGE_DURATION.labels("fetch").time():
        fetched = fetch_dicomweb(
            InstanceRef(ref.url, ref.study, ref.series, ref.instance),
            servers,
            index,
            settings.max_request_bytes if ref.instance else series_fetch_limit(settings),
            context.remaining_s(),
        )
    return fetched[0] if ref.instance else fetched


def _store(
    rendered: list[ImageResult], url: str, servers: DicomWebServers, context: RequestContext
) -> None:
    """STOW-RS every DICOM object of the answer to ``url`` in one call: the heatmaps'
    objects, the Segmentations, then the reports that name them; each says how it went."""
    holders: list[Heatmap | DicomObject] = []
    for result in rendered:
        holders += [explanation.heatmap for explanation in result.explanations]
        holders += [result.segmentation] if result.segmentation is not None else []
    holders += [result.report for result in rendered if result.report is not None]
    made = [
        (holder, holder.uids.instance, base64.b64decode(holder.data))
        for holder in holders
        if holder.data is not None and holder.uids is not None
    ]
    if not made:
        return
    objects = [(uid, data) for _, uid, data in made]
    outcomes = store(objects, url, servers, context.remaining_s())
    for (holder, _, _), outcome in zip(made, outcomes, strict=True):
        holder.stored = StoreOutcome(ok=outcome.ok, message=outcome.message)


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
