"""The routes (thin views): parse, call the explain path or the runtime, answer JSON."""

from __future__ import annotations

import select
import socket
from typing import Any

from flask import Blueprint, Response, current_app, request

from service.engine.models import LoadedModel
from service.engine.runtime import Runtime
from service.errors import UnsupportedMediaType
from service.explain import dumps, explain
from service.schemas import parse_explain_request

api = Blueprint("api", __name__)


def _runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["gradcam_runtime"]
    return runtime


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status=status, mimetype="application/json")


def _model_summary(model: LoadedModel, default: str) -> dict[str, Any]:
    return {
        "name": model.name,
        "arch": model.spec.arch,
        "default": model.name == default,
        "num_classes": model.num_classes,
        "multilabel": model.spec.multilabel,
        "channels": model.channels,
        "input_size": list(model.input_size),
        "default_layer": model.default_layer,
    }


def _client_disconnected() -> bool:
    """True once the client has closed its connection (gunicorn exposes the socket)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        # Readable with nothing to read: the peer closed (a pipelined request would
        # be readable with data).
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


@api.post("/v1/explain")
def explain_view() -> Response:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"Send the request as JSON (Content-Type: application/json), not "
            f"'{request.mimetype or 'no content type'}'.", code="unsupported_media_type")
    body = parse_explain_request(request.get_data(cache=False))
    return json_response(explain(body, _runtime(), _client_disconnected))


@api.get("/v1/models")
def models_view() -> Response:
    runtime = _runtime()
    return json_response({"models": [_model_summary(m, runtime.default_model)
                                     for m in runtime.models.values()]})


@api.get("/v1/models/<name>")
def model_view(name: str) -> Response:
    runtime = _runtime()
    model = runtime.get_model(name)
    return json_response({
        **_model_summary(model, runtime.default_model),
        "labels": list(model.labels),
        "mean": list(model.mean),
        "std": list(model.std),
        "resize": model.spec.resize,
        "device": str(model.device),
    })


@api.get("/v1/models/<name>/layers")
def layers_view(name: str) -> Response:
    model = _runtime().get_model(name)
    return json_response({
        "model": model.name,
        "default_layer": model.default_layer,
        "layers": [{"name": layer.name, "kind": layer.kind, "channels": layer.channels,
                    "height": layer.height, "width": layer.width} for layer in model.layers],
    })


@api.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@api.get("/readyz")
def readyz() -> Response:
    if _runtime().ready:
        return json_response({"status": "ready"})
    return json_response({"status": "starting"}, status=503)
