"""The Open Inference Protocol's binary tensor extension: tensors as raw bytes.

A body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
tensors that carry ``"binary_data_size"`` in their parameters, in the order they are
listed. Numbers are little-endian in row-major order; a BYTES tensor is each element
as a 4-byte little-endian length and its bytes. A 512² FP32 heatmap is then 1 MiB of
bytes instead of about 2.5 MB of JSON text that must be parsed back.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from service.contract.errors import BadRequest, ErrorCode, InvalidField
from service.contract.inference_protocol import InferRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")
# The little-endian numpy type of each numeric datatype a client may send us.
NUMPY_TYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part after it (empty without the extension)."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    # ASCII digits only ("²" and "٣" pass isdigit() but not int()), and no more of them
    # than the body's own length has (int() refuses over 4300 digits).
    if (
        not (text.isascii() and text.isdigit())
        or len(text.lstrip("0")) > len(str(len(body)))
        or not 0 < int(text) <= len(body)
    ):
        raise BadRequest(
            f"The {HEADER_LENGTH} header must be the JSON header's length in bytes, "
            f"between 1 and the body's {len(body)}; it is '{header_length[:32]}'.",
            code=ErrorCode.BAD_REQUEST,
        )
    return body[: int(text)], body[int(text) :]


def binary_inputs(request: InferRequest, binary: bytes) -> dict[str, bytes]:
    """Each input's raw bytes, cut from ``binary`` by its ``binary_data_size``."""
    found: dict[str, bytes] = {}
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidField(
                f"Input '{tensor.name}': binary_data_size must be a byte count.",
                field=f"inputs.{tensor.name}.parameters.binary_data_size",
            )
        if offset + size > len(binary):
            raise BadRequest(
                f"Input '{tensor.name}' announces {size} bytes of binary data, but the "
                f"body holds only {len(binary) - offset} more.",
                code=ErrorCode.BAD_REQUEST,
            )
        found[tensor.name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise BadRequest(
            f"The body has {len(binary) - offset} bytes after the binary inputs it announces.",
            code=ErrorCode.BAD_REQUEST,
        )
    return found


def unpack_bytes(raw: bytes, name: str, count: int) -> list[bytes]:
    """The ``count`` elements of a binary BYTES tensor (its shape says how many)."""
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if len(elements) == count:
            raise BadRequest(
                f"Input '{name}': its binary data holds more than the {count} elements "
                "its shape gives.",
                code=ErrorCode.BAD_REQUEST,
            )
        if offset + _LENGTH.size > len(raw):
            raise BadRequest(
                f"Input '{name}': its binary BYTES data ends inside an element's length.",
                code=ErrorCode.BAD_REQUEST,
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise BadRequest(
                f"Input '{name}': an element of {length} bytes runs past the tensor's end.",
                code=ErrorCode.BAD_REQUEST,
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor as binary data."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def numbers(raw: bytes, datatype: str, name: str) -> np.ndarray:
    """A numeric tensor from its binary data (flat, row-major)."""
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidField(
            f"Input '{name}': datatype {datatype} is not a number type.",
            field=f"inputs.{name}.datatype",
        )
    item = np.dtype(dtype).itemsize
    if len(raw) % item:
        raise BadRequest(
            f"Input '{name}': {len(raw)} bytes is not a whole number of {datatype} values.",
            code=ErrorCode.BAD_REQUEST,
        )
    return np.frombuffer(raw, dtype=dtype)
