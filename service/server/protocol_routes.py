"""The Open Inference Protocol's REST routes (``/v2``), beside ``/v1``.

Thin views as in ``routes.py``: health, metadata, and ``infer``, which goes through the
same admission (queue wait, memory), pipeline, engine batching, limits and auth as
``POST /v1/explain`` (``pipeline/protocol.py``). Errors take the protocol's shape in
``app.py``. ``/v2/models/{name}/config`` is Triton's model configuration, which
``perf_analyzer`` asks for.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from service import package_version
from service.contract.binary_tensors import HEADER_LENGTH, split_body
from service.contract.errors import ErrorCode, UnknownModel, UnsupportedMediaType
from service.contract.inference_protocol import (
    HEATMAP_SIZES,
    IMAGE_INPUT,
    INPUTS,
    OUTPUTS,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorConfig,
    TensorMetadata,
)
from service.contract.terms import METHODS
from service.pipeline.protocol import MODEL_VERSION, infer, parse_infer_request, response_body
from service.server.routes import (
    admitted_body,
    current_engine,
    current_settings,
    json_response,
    refuse_compressed_body,
    serving_ready,
)
from service.transport.interface import ModelInfo

protocol = Blueprint("protocol", __name__)
PLATFORM = "gradcam-service"
# What an infer body may be: Triton's client sends no Content-Type at all (a page on
# another origin cannot: security.py refuses that), KServe's names JSON or octet-stream.
_BODY_TYPES = ("application/json", "application/octet-stream", "")
# The protocol's extensions this server speaks (as Triton names them).
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def _model(name: str, version: str | None) -> ModelInfo:
    model = current_engine().catalog().get(name)
    if version is not None and version != MODEL_VERSION:
        raise UnknownModel(
            f"Model '{name}' has only version {MODEL_VERSION}, not '{version}'.",
            field="version",
        )
    return model


def _triton_type(datatype: str) -> str:
    """A protocol datatype as Triton's configuration names it (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _input_config(name: str, datatype: str) -> TensorConfig:
    config = TensorConfig(name=name, data_type=_triton_type(datatype), dims=[-1])
    if name != IMAGE_INPUT:
        config.optional = True  # written only where set: the image is required
    return config


def _shapes(model: ModelInfo) -> dict[str, list[int]]:
    """Each output's shape, -1 where a request decides (image count, map size, top_k)."""
    return {
        "probabilities": [-1, model.num_classes],
        "heatmap": [-1, -1, -1],
        "heatmap_png": [-1],
        "labels": [-1, -1],
        "target": [-1],
    }


@protocol.get("/v2")
def server_metadata() -> Response:
    return json_response(
        ServerMetadata(name=PLATFORM, version=package_version(), extensions=EXTENSIONS)
    )


@protocol.get("/v2/health/live")
def server_live() -> Response:
    return json_response(ServerLive(live=True))


@protocol.get("/v2/health/ready")
def server_ready() -> Response:
    ready = serving_ready()
    return json_response(ServerReady(ready=ready), status=200 if ready else 503)


@protocol.get("/v2/models/<name>/ready")
@protocol.get("/v2/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    model = _model(name, version)
    ready = serving_ready()
    return json_response(ModelReady(name=model.name, ready=ready), status=200 if ready else 503)


@protocol.get("/v2/models/<name>")
@protocol.get("/v2/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    model = _model(name, version)
    shapes = _shapes(model)
    return json_response(
        ModelMetadata(
            name=model.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[
                TensorMetadata(name=name, datatype=datatype, shape=[-1])
                for name, datatype in INPUTS.items()
            ],
            outputs=[
                TensorMetadata(name=output, datatype=datatype, shape=shapes[output])
                for output, datatype in OUTPUTS.items()
            ],
            parameters={
                "methods": list(METHODS),
                "layers": list(model.layer_names()),
                "default_layer": model.default_layer,
                "heatmap_sizes": list(HEATMAP_SIZES),
                "input_size": list(model.input_size),
                "labels": list(model.labels),
            },
        )
    )


@protocol.get("/v2/models/<name>/config")
@protocol.get("/v2/models/<name>/versions/<version>/config")
def model_config(name: str, version: str | None = None) -> Response:
    model = _model(name, version)
    shapes = _shapes(model)
    return json_response(
        ModelConfig(
            name=model.name,
            platform=PLATFORM,
            max_batch_size=0,
            input=[_input_config(name, datatype) for name, datatype in INPUTS.items()],
            output=[
                TensorConfig(name=output, data_type=_triton_type(datatype), dims=shapes[output])
                for output, datatype in OUTPUTS.items()
            ],
        )
    )


@protocol.post("/v2/models/<name>/infer")
@protocol.post("/v2/models/<name>/versions/<version>/infer")
def model_infer(name: str, version: str | None = None) -> Response:
    if request.mimetype not in _BODY_TYPES:
        raise UnsupportedMediaType(
            f"Send the request as JSON (Content-Type: application/json), or with binary "
            f"tensors as application/octet-stream, not '{request.mimetype}'.",
            code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    refuse_compressed_body()
    model = _model(name, version)
    with admitted_body() as (data, context):
        header, binary = split_body(data, request.headers.get(HEADER_LENGTH))
        parsed = parse_infer_request(header, context.reserve_parsing)
        answer, tensors = infer(
            model.name, parsed, binary, current_engine(), current_settings(), context
        )
    body, header_length = response_body(answer, tensors)
    if header_length is None:
        return Response(body, mimetype="application/json")
    response = Response(body, mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(header_length)
    return response
