"""The Open Inference Protocol (KServe V2, REST): its request and response models.

The second door to the same pipeline (``pipeline/protocol.py``): clients built for
KServe, Triton or MLServer (``tritonclient.http``, the ``kserve`` client,
``perf_analyzer``) call ``/v2/...`` as they call those servers. One model of the
models file is one protocol model; its input is ``image`` (BYTES, one encoded image
file per element), its outputs are the names in ``OUTPUTS``. Tensors travel as
JSON ``data`` or, with the binary tensor extension, as raw bytes after the JSON
header (``contract/binary_tensors.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic.json_schema import WithJsonSchema

# The protocol's element types (those a client may name; we produce BYTES, FP32, INT64).
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
ParameterValue = StrictBool | StrictInt | StrictFloat | StrictStr
# Stops at its first bad value (json_body.py bounds the keys).
Parameters = Annotated[dict[str, ParameterValue], Field(fail_fast=True)]
# JSON tensor data: row-major, flat or nested; BYTES elements are strings. Elements are
# checked where they are read (pipeline/protocol.py), by the input they belong to.
TensorData = Annotated[
    list[Any], WithJsonSchema({"type": "array", "items": {}, "description": "row-major"})
]

# What each model takes and gives (name, datatype, shape; -1 = any length).
IMAGE_INPUT = "image"
TARGET_INPUT = "target"
INPUTS: dict[str, Literal["BYTES", "INT64"]] = {
    IMAGE_INPUT: "BYTES",  # [n]: one encoded image file per element
    TARGET_INPUT: "INT64",  # [n], optional: the class to explain per image, -1 the top one
}
# The ``heatmap_size`` parameter's values, the default first.
HEATMAP_SIZES = ("input", "layer", "original")
OUTPUTS: dict[str, Literal["FP32", "BYTES", "INT64"]] = {
    "probabilities": "FP32",  # [n, classes]: softmax, or sigmoid for multi-label models
    "heatmap": "FP32",  # [n, h, w] in [0, 1]
    "heatmap_png": "BYTES",  # [n]: the coloured heatmap as a PNG file
    "labels": "BYTES",  # [n, k]: the top-k class names, most likely first
    "target": "INT64",  # [n]: the class each heatmap explains
}
# Request parameters this service reads (others are ignored, as the protocol asks).
REQUEST_PARAMETERS = ("method", "layer", "target", "top_k", "heatmap_size", "frame")


class _Message(BaseModel):
    # Clients add fields of their own (Triton's "sequence_id", ...): accept and ignore.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class RequestInput(_Message):
    """An input tensor: ``data`` in the JSON, or ``binary_data_size`` bytes after it."""

    name: StrictStr
    shape: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(fail_fast=True)]
    datatype: Datatype
    parameters: Parameters = {}
    data: TensorData | None = None


class RequestOutput(_Message):
    """An output the client asks for; ``binary_data`` returns it as raw bytes."""

    name: StrictStr
    parameters: Parameters = {}


class InferRequest(_Message):
    """Body (or JSON header) of ``POST /v2/models/{name}/infer``."""

    id: StrictStr | None = None
    parameters: Parameters = Field(
        default={},
        description=(
            "method (gradcam, gradcam++, xgradcam, layercam, hirescam), layer, target (a "
            "class index or label for every image; the INT64 input `target` gives one per "
            "image, -1 for the top class), top_k (classes in `labels`, default 5), "
            "heatmap_size (input (default), layer, or original when all images share a "
            "size), frame (of multi-frame images), binary_data_output."
        ),
    )
    # Lists stop at their first bad item: the error report stays small (json_body.py).
    inputs: Annotated[list[RequestInput], Field(min_length=1, fail_fast=True)]
    outputs: Annotated[list[RequestOutput], Field(fail_fast=True)] | None = Field(
        default=None, description="The outputs to return; all of them when absent."
    )


class ResponseOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: Literal["FP32", "BYTES", "INT64"]
    parameters: dict[str, int] | None = Field(
        default=None, description="binary_data_size: the tensor's bytes after the JSON header."
    )
    # A numpy array (written by orjson) or strings; absent when the tensor is binary.
    data: Annotated[Any, WithJsonSchema({"type": "array", "items": {}})] = None


class InferResponse(BaseModel):
    """Body (or JSON header) of a 200 answer to an infer request."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, str] = Field(
        default={}, description="What computed the answer: method, layer, precision."
    )
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``; ``parameters`` lists what a request may choose."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str | list[str] | list[int]]


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerReady(BaseModel):
    ready: bool


class ServerLive(BaseModel):
    live: bool


class ProtocolError(BaseModel):
    """Every error on ``/v2``, in the protocol's shape (the status code says the kind)."""

    error: str


class TensorConfig(BaseModel):
    """A tensor in Triton's model configuration."""

    name: str
    data_type: str
    dims: list[int]
    optional: bool = False


class ModelConfig(BaseModel):
    """``GET /v2/models/{name}/config``: Triton's model configuration, the part
    ``perf_analyzer`` reads (``max_batch_size`` 0: shapes include the image count)."""

    name: str
    platform: str
    max_batch_size: int
    input: list[TensorConfig]
    output: list[TensorConfig]
