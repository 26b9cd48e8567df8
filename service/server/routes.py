"""The routes (thin views): parse, call the explain path or the engine, answer JSON."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, Response, current_app, g, request
from pydantic import BaseModel

from service.contract.catalog_responses import (
    Layers,
    LayerShape,
    ModelDetail,
    ModelList,
    ModelSummary,
    Status,
)
from service.contract.errors import ErrorCode, Overloaded, UnsupportedMediaType
from service.contract.flat_options import refuse_query_beside_json
from service.contract.request_parsing import parse_explain_request
from service.contract.responses import ExplainResponse, to_json
from service.contract.settings import Settings
from service.memory import MemoryBudget, RequestMemory
from service.pipeline.budgets import BODY_COPIES
from service.pipeline.context import RequestContext
from service.pipeline.explain import explain
from service.server.environ import draining
from service.server.image_doors import FORM_TYPE, RAW_TYPES, image_request, is_image_door
from service.server.pictures import RANDOM_WEIGHTS_HEADER, picture_response
from service.transport.interface import Catalog, Engine, ModelInfo

api = Blueprint("api", __name__)


def current_engine() -> Engine:
    engine: Engine = current_app.extensions["gradcam_engine"]
    return engine


def current_settings() -> Settings:
    settings: Settings = current_app.extensions["gradcam_settings"]
    return settings


def serving_ready() -> bool:
    """This worker takes new work: not stopping, the memory budget's fixed part measured
    (before that, every request would be admitted as if the idle service held nothing),
    and an engine answering with its models loaded."""
    if draining(request.environ):
        return False
    memory: MemoryBudget | None = current_app.extensions.get("gradcam_memory")
    if memory is not None and not memory.measured:
        return False
    return current_engine().ready()


def _catalog() -> Catalog:
    return current_engine().catalog()


def json_response(answer: BaseModel, status: int = 200) -> Response:
    return Response(to_json(answer), status=status, mimetype="application/json")


def _summary_fields(model: ModelInfo, default: str) -> dict[str, object]:
    return {
        "name": model.name,
        "arch": model.arch,
        "default": model.name == default,
        "num_classes": model.num_classes,
        "multilabel": model.multilabel,
        "channels": model.channels,
        "input_size": model.input_size,
        "default_layer": model.default_layer,
        "random_weights": model.random_weights,
        "modalities": list(model.modalities),
        "body_parts": list(model.body_parts),
    }


def client_disconnected() -> bool:
    """True once the client has closed its connection (gunicorn exposes the socket)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        # A peek that does not wait: b"" means the peer closed; data (a pipelined
        # request) or nothing to read yet (BlockingIOError) means it is still there.
        # No select(): it fails for descriptors >= 1024.
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


@api.post("/v1/explain")
def explain_view() -> Response:
    """Three doors to one request: a JSON body; an image file as the body, or a form of
    image files, with their options in the query (``image_doors.py``), which may be
    answered with the picture itself (``pictures.py``)."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not is_image_door(mimetype):
        raise UnsupportedMediaType(
            f"Send the request as JSON (Content-Type: application/json), as an image file "
            f"({', '.join(RAW_TYPES)}) or as a form of image files ({FORM_TYPE}), not "
            f"'{mimetype or 'no content type'}'.",
            code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    refuse_compressed_body()
    settings = current_settings()
    query = {name: request.args.getlist(name) for name in request.args}
    if mimetype == "application/json":
        refuse_query_beside_json(query)
    with admitted_body() as (data, context):
        if mimetype == "application/json":
            body = parse_explain_request(data, context.reserve_parsing)
            answer = explain(body, current_engine(), settings, context)
            return _marked(json_response(answer), answer)
        boundary = request.mimetype_params.get("boundary", "")
        body = image_request(
            mimetype, data, boundary, query, context, settings.max_images_per_request
        )
        answer = explain(body, current_engine(), settings, context)
        picture = picture_response(body.heatmap, answer, request.accept_mimetypes)
        response = _marked(picture or json_response(answer), answer)
        response.vary.add("Accept")  # a picture or JSON for the same URL: caches must know
        return response


def _marked(response: Response, answer: ExplainResponse) -> Response:
    if answer.random_weights:
        response.headers[RANDOM_WEIGHTS_HEADER] = "true"
    return response


@contextmanager
def admitted_body() -> Iterator[tuple[bytes, RequestContext]]:
    """The body of a request that asks for compute, once the server can take it: not
    too far behind (else 503 at once), and with memory reserved for the body's copies.
    Yields the body and the request's context (its deadline counts from when it
    arrived, or queued for a thread; its client; its memory reservation)."""
    settings = current_settings()
    waited = g.get("thread_wait_s", 0.0)
    if settings.max_queue_wait_s and waited > settings.max_queue_wait_s:
        # It sat in the worker's queue for a thread: the engine's queue is surely no shorter.
        raise Overloaded(
            f"The server is {waited:.1f} s behind (limit "
            f"{settings.max_queue_wait_s:g} s); retry shortly.",
            retry_after_s=max(1, round(waited)),
        )
    data = request.get_data(cache=False)
    memory_wait_s = max(0.0, settings.max_queue_wait_s - waited)
    with RequestMemory(current_app.extensions.get("gradcam_memory"), memory_wait_s) as memory:
        memory.need(BODY_COPIES * len(data))  # before the body is parsed
        started = g.get("started_monotonic", time.monotonic())
        yield data, RequestContext.start(settings, started, client_disconnected, memory, len(data))


def refuse_compressed_body() -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"The body has Content-Encoding '{encoding}'; send it uncompressed.",
            code=ErrorCode.UNSUPPORTED_CONTENT_ENCODING,
        )


@api.get("/v1/models")
def models_view() -> Response:
    catalog = _catalog()
    return json_response(
        ModelList(
            models=[
                ModelSummary.model_validate(_summary_fields(m, catalog.default_model))
                for m in catalog.models.values()
            ]
        )
    )


@api.get("/v1/models/<name>")
def model_view(name: str) -> Response:
    catalog = _catalog()
    model = catalog.get(name)
    return json_response(
        ModelDetail.model_validate(
            {
                **_summary_fields(model, catalog.default_model),
                "labels": list(model.labels),
                "mean": list(model.mean),
                "std": list(model.std),
                "resize": model.resize,
                "library": model.library,
                "crop_pct": model.crop_pct,
                "scale_size": list(model.scale_size) if model.scale_size else None,
                "interpolation": model.interpolation,
                "crop_offset": model.crop_offset,
                "channel_order": model.channel_order,
                "sources": model.sources,
                "device": model.device,
                "precision": model.precision,
                "memory_format": model.memory_format,
                **_volume_fields(model),
            }
        )
    )


def _volume_fields(model: ModelInfo) -> dict[str, object]:
    """A volume model's way from a volume to its input (left out for 2-D models)."""
    if not model.is_volume:
        return {}
    found: dict[str, object] = {"orientation": model.orientation}
    if model.spacing is not None:
        found["spacing"] = list(model.spacing)
    if model.window is not None:
        found["window"] = list(model.window)
    return found


@api.get("/v1/models/<name>/layers")
def layers_view(name: str) -> Response:
    model = _catalog().get(name)
    return json_response(
        Layers(
            model=model.name,
            default_layer=model.default_layer,
            layers=[
                LayerShape(
                    name=layer.name,
                    kind=layer.kind,
                    channels=layer.channels,
                    height=layer.height,
                    width=layer.width,
                    **({"depth": layer.depth} if layer.depth is not None else {}),
                )
                for layer in model.layers
            ],
        )
    )


@api.get("/healthz")
def healthz() -> Response:
    return json_response(Status(status="ok"))


@api.get("/readyz")
def readyz() -> Response:
    """200 while an engine answers a ping with its models loaded and its model loop alive,
    the memory budget knows what the idle service holds, and this worker is not stopping
    (a load balancer then sends no new work here)."""
    if draining(request.environ):
        return json_response(Status(status="draining"), status=503)
    if serving_ready():
        return json_response(Status(status="ready"))
    return json_response(Status(status="unavailable"), status=503)
