"""An Open Inference Protocol request through the one pipeline.

The protocol's request becomes an ``ExplainRequest`` (validated like any other, so
its limits, errors and did-you-mean are those of ``/v1``), ``explain.compute`` decodes
and fits the images and calls the engine, and the results become the protocol's
output tensors: ``probabilities``, ``heatmap``, ``heatmap_png``, ``labels``, ``target``
(``contract/inference_protocol.py``).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from service import metrics
from service.contract.binary_tensors import binary_inputs, numbers, pack_bytes, unpack_bytes
from service.contract.errors import ErrorCode, InvalidField, PayloadTooLarge
from service.contract.inference_protocol import (
    HEATMAP_SIZES,
    IMAGE_INPUT,
    OUTPUTS,
    TARGET_INPUT,
    InferRequest,
    InferResponse,
    RequestInput,
    ResponseOutput,
)
from service.contract.json_body import json_object
from service.contract.request_parsing import invalid_field
from service.contract.requests import ExplainRequest
from service.contract.responses import to_json
from service.contract.settings import Settings
from service.contract.suggestions import close_matches, did_you_mean
from service.contract.terms import HeatmapSize
from service.imaging.encoders import encode_image
from service.imaging.render import colour_image, heatmap
from service.imaging.values import to_uint8
from service.imaging.volume_pictures import three_views
from service.pipeline.context import RequestContext
from service.pipeline.engine_call import ExplainedImage, ExplainedVolume
from service.pipeline.explain import compute
from service.pipeline.volume_results import map_at
from service.pipeline.volumes import PreparedVolume
from service.transport.interface import Engine

# The one version each model has: the models file holds one set of weights per key.
MODEL_VERSION = "1"


@dataclass(frozen=True)
class OutputTensor:
    """One output of the answer, before it is written as JSON or binary data."""

    name: str
    shape: list[int]
    value: np.ndarray | list[bytes] | list[str]
    binary: bool


def parse_infer_request(
    header: bytes, reserve: Callable[[int], None] | None = None
) -> InferRequest:
    """The JSON header, validated; problems are 400 (not JSON), 413 (too many values) or
    422 (a field). ``reserve``: as ``json_body.json_object``'s."""
    data = json_object(header, reserve)
    try:
        return InferRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
        ).lstrip(".")
        raise InvalidField(f"Field '{field}': {first['msg']}.", field=field) from None


def _input(request: InferRequest, name: str) -> RequestInput | None:
    return next((tensor for tensor in request.inputs if tensor.name == name), None)


def _flat(tensor: RequestInput, data: list[Any]) -> list[Any]:
    """JSON tensor data as a flat row-major list: given flat, or nested exactly as the
    tensor's shape (each level as long as its dimension). Level by level, not recursion:
    the JSON may nest as deep as the parser allows."""
    if not any(isinstance(item, list) for item in data):
        return data
    level: list[Any] = [data]
    for size in tensor.shape:
        if any(not isinstance(part, list) or len(part) != size for part in level):
            break
        level = [item for part in level for item in part]
    else:
        if not any(isinstance(item, list) for item in level):
            return level
    raise InvalidField(
        f"Input '{tensor.name}' nests its data otherwise than its shape {tensor.shape}; "
        "send the elements flat (row-major) or nested as the shape.",
        field=f"inputs.{tensor.name}.data",
    )


def _elements(tensor: RequestInput, raw: dict[str, bytes], most: int) -> list[Any]:
    """A tensor's elements (bytes for binary BYTES, numbers or strings otherwise),
    checked against its shape; more than ``most`` is a 413 before any is read."""
    expected = math.prod(tensor.shape)
    if expected > most:
        raise PayloadTooLarge(
            f"Input '{tensor.name}' has {expected} elements; the limit is {most} (one per image).",
            code=ErrorCode.TOO_MANY_IMAGES,
            field=f"inputs.{tensor.name}.shape",
        )
    if tensor.name in raw:
        if tensor.datatype == "BYTES":
            found: list[Any] = unpack_bytes(raw[tensor.name], tensor.name, expected)
        else:
            found = numbers(raw[tensor.name], tensor.datatype, tensor.name).tolist()
    elif tensor.data is not None:
        found = _flat(tensor, tensor.data)
    else:
        raise InvalidField(
            f"Input '{tensor.name}' has neither data nor binary_data_size.",
            field=f"inputs.{tensor.name}.data",
        )
    if len(found) != expected:
        raise InvalidField(
            f"Input '{tensor.name}' has shape {tensor.shape} ({expected} elements) but "
            f"{len(found)} elements of data.",
            field=f"inputs.{tensor.name}.shape",
        )
    return found


def _images(request: InferRequest, raw: dict[str, bytes], most: int) -> list[str]:
    """The image files as base64 (JSON BYTES elements are base64 already)."""
    tensor = _input(request, IMAGE_INPUT)
    if tensor is not None and tensor.datatype != "BYTES":
        raise InvalidField(
            f"Input '{IMAGE_INPUT}' is {tensor.datatype}; it must be BYTES, one encoded image "
            "file (PNG, JPEG, TIFF, DICOM, ...) per element: pixel tensors are not read.",
            field=f"inputs.{IMAGE_INPUT}.datatype",
        )
    if tensor is None:
        names = [t.name for t in request.inputs]
        close = close_matches(IMAGE_INPUT, names)
        rename = f" Rename '{close[0]}' to '{IMAGE_INPUT}'." if close else ""
        raise InvalidField(
            f"The request needs the BYTES input '{IMAGE_INPUT}' (one encoded image file "
            f"per element); it has {names}.{rename}",
            field=f"inputs.{IMAGE_INPUT}",
        )
    return [
        base64.b64encode(item).decode("ascii") if isinstance(item, bytes) else str(item)
        for item in _elements(tensor, raw, most)
    ]


def _targets(
    request: InferRequest, raw: dict[str, bytes], count: int
) -> list[int | str | None] | None:
    """One class per image: the INT64 input ``target`` (-1: top class), or the
    ``target`` parameter for all, or None (each image's top class)."""
    tensor = _input(request, TARGET_INPUT)
    if tensor is not None:
        values = _elements(tensor, raw, count)
        if len(values) != count or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise InvalidField(
                f"Input '{TARGET_INPUT}' must hold one integer class per image ({count}).",
                code=ErrorCode.TARGETS_LENGTH,
                field=f"inputs.{TARGET_INPUT}",
            )
        return [None if v < 0 else v for v in values]
    given = request.parameters.get("target")
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, int | str):
        raise InvalidField(
            "Parameter 'target' is a class index or label.", field="parameters.target"
        )
    return [given] * count


def _wanted(request: InferRequest) -> dict[str, bool]:
    """The outputs to return, each with whether it travels as binary data."""
    default_binary = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return dict.fromkeys(OUTPUTS, default_binary)
    wanted: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in OUTPUTS:
            close = close_matches(output.name, OUTPUTS)
            raise InvalidField(
                f"There is no output '{output.name}'; the outputs are "
                f"{', '.join(OUTPUTS)}.{did_you_mean(close)}",
                field="outputs",
                suggestions=close,
            )
        binary = output.parameters.get("binary_data", default_binary)
        wanted[output.name] = binary is True
    return wanted


def _explain_request(
    model: str,
    request: InferRequest,
    raw: dict[str, bytes],
    wanted: dict[str, bool],
    settings: Settings,
) -> ExplainRequest:
    images = _images(request, raw, settings.max_images_per_request)
    size = request.parameters.get("heatmap_size", "input")
    if size not in HEATMAP_SIZES:
        close = close_matches(str(size), HEATMAP_SIZES)
        raise InvalidField(
            f"Parameter 'heatmap_size' is one of {', '.join(HEATMAP_SIZES)}, not "
            f"'{size}'.{did_you_mean(close)}",
            field="parameters.heatmap_size",
            suggestions=close,
        )
    # What the budget charges for: a picture if one is drawn, else the array, or nothing
    # (the array beside a picture is charged too: ``compute``'s ``arrays``).
    charged = "png" if "heatmap_png" in wanted else "array" if "heatmap" in wanted else "none"
    fields: dict[str, Any] = {
        "model": model,
        "images": images,
        "targets": _targets(request, raw, len(images)),
        "heatmap": {"format": charged, "size": size},
    }
    for name in ("method", "layer", "top_k", "frame"):
        if name in request.parameters:
            fields[name] = request.parameters[name]
    try:
        return ExplainRequest.model_validate(fields)
    except ValidationError as error:
        raise invalid_field(error) from None


def infer(
    model: str,
    request: InferRequest,
    binary: bytes,
    engine: Engine,
    settings: Settings,
    context: RequestContext | None = None,
) -> tuple[InferResponse, list[OutputTensor]]:
    """The answer to ``request`` for ``model``, within ``context`` (as ``explain``'s);
    ``binary`` is the body after the JSON header (the binary tensor extension), empty
    without it."""
    context = context or RequestContext.start(settings)
    raw = binary_inputs(request, binary)
    wanted = _wanted(request)
    explain_request = _explain_request(model, request, raw, wanted, settings)
    computed = compute(explain_request, engine, settings, context, arrays="heatmap" in wanted)
    info = computed.model
    results: list[ExplainedImage] | list[ExplainedVolume] = computed.results or computed.volumes
    size = explain_request.heatmap.size
    maps: list[np.ndarray] = []
    pngs: list[bytes] = []
    with metrics.STAGE_DURATION.labels("render").time():
        for result in results:
            context.check_still_wanted()
            heat, picture = _drawn(result, size, "heatmap_png" in wanted)
            maps.append(heat)
            if picture is not None:
                pngs.append(encode_image(picture, "png"))
                computed.budget.pictures_encoded(result.prepared.index, len(pngs[-1]) * 4 // 3)
    tensors = _tensors(results, maps, pngs, wanted, explain_request.top_k, info.labels)
    answer = InferResponse(
        model_name=info.name,
        model_version=MODEL_VERSION,
        parameters={
            "method": explain_request.method,
            "layer": computed.layer,
            "precision": info.precision,
        },
        outputs=[],
    )
    if request.id is not None:
        answer.id = request.id
    return answer, tensors


def _drawn(
    result: ExplainedImage | ExplainedVolume, size: HeatmapSize, picture: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The first explanation's map at ``size`` (a volume's ``(d, h, w)``), and its picture
    if wanted (a volume's: three slices through the peak)."""
    prepared = result.prepared
    if isinstance(prepared, PreparedVolume):
        heat, affine = map_at(result.cams[0], prepared, size)
        return heat, three_views(heat, affine, None, "png") if picture else None
    heat = heatmap(result.cams[0], prepared.geometry, size)
    return heat, np.asarray(colour_image(to_uint8(heat))) if picture else None


def _tensors(
    results: list[ExplainedImage] | list[ExplainedVolume],
    maps: list[np.ndarray],
    pngs: list[bytes],
    wanted: dict[str, bool],
    top_k: int,
    labels: tuple[str, ...] | list[str],
) -> list[OutputTensor]:
    count = len(results)
    tensors: list[OutputTensor] = []
    for name, binary in wanted.items():
        if name == "probabilities":
            scores = np.stack([r.scores for r in results]).astype(np.float32, copy=False)
            tensors.append(OutputTensor(name, list(scores.shape), scores, binary))
        elif name == "heatmap":
            shapes = {m.shape for m in maps}
            if len(shapes) > 1:
                raise InvalidField(
                    "heatmap_size 'original' gives one map per image at that image's size, "
                    f"and these images differ ({sorted(shapes)}): a tensor needs one shape. "
                    "Ask for 'input', or send images of one size.",
                    field="parameters.heatmap_size",
                )
            stacked = np.stack(maps).astype(np.float32, copy=False)
            tensors.append(OutputTensor(name, list(stacked.shape), stacked, binary))
        elif name == "heatmap_png":
            tensors.append(OutputTensor(name, [count], pngs, binary))
        elif name == "labels":
            k = min(top_k, len(labels))
            names = [labels[int(i)] for r in results for i in r.order[:k]]
            tensors.append(OutputTensor(name, [count, k], names, binary))
        else:
            explained = np.asarray([r.targets[0] for r in results], dtype=np.int64)
            tensors.append(OutputTensor(name, [count], explained, binary))
    return tensors


def response_body(answer: InferResponse, tensors: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The body: JSON alone, or (binary extension) the JSON header and the tensors after
    it, with the header's length."""
    blobs: list[bytes] = []
    for tensor in tensors:
        output = ResponseOutput(name=tensor.name, shape=tensor.shape, datatype=OUTPUTS[tensor.name])
        if tensor.binary:
            blob = _binary(tensor)
            output.parameters = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output.data = _json_data(tensor)
        answer.outputs.append(output)
    header = to_json(answer)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _binary(tensor: OutputTensor) -> bytes:
    if isinstance(tensor.value, np.ndarray):
        return tensor.value.astype(tensor.value.dtype.newbyteorder("<"), copy=False).tobytes()
    return pack_bytes([v.encode() if isinstance(v, str) else v for v in tensor.value])


def _json_data(tensor: OutputTensor) -> np.ndarray | list[str]:
    if isinstance(tensor.value, np.ndarray):
        return tensor.value.ravel()
    # JSON has no bytes: a PNG file travels as base64 text.
    return [
        base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v for v in tensor.value
    ]
