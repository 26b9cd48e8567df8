"""``POST /v1/explain``'s image doors: an image file as the whole body, or a
``multipart/form-data`` form of image files.

Both become the ``ExplainRequest`` a JSON body makes (``contract/flat_options.py``), so
everything after it (limits, the memory budget, the engine, errors) is the JSON door's.
The body was read and admitted as any other (``routes.admitted_body``): within
``GRADCAM_MAX_REQUEST_BYTES``, checked by the worker before the view runs, and with its
copies reserved in the memory budget.

A form is parsed from that body, in memory: never spooled to a temporary file (Werkzeug's
default past 500 KB), whose bytes no budget would count. Its parts' copies are reserved
before it is parsed; it may have ``max_images_per_request`` parts and a few more, each
text field (``options``) at most ``FIELD_LIMIT_BYTES``: past either it is a 413, and a
form that is not well formed is a 400, before any image is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import IO, Any, cast

from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import MultiPartParser

from service.contract.errors import (
    BadRequest,
    ErrorCode,
    InvalidField,
    PayloadTooLarge,
    ServiceError,
)
from service.contract.flat_options import OPTIONS_FIELD, flat_request
from service.contract.json_body import json_object
from service.contract.requests import ExplainRequest
from service.contract.suggestions import close_matches, did_you_mean
from service.pipeline.context import RequestContext

# The body is the image file itself: the types a client names it by (the bytes, not the
# type, then say which format it is, as for base64 in JSON).
RAW_TYPES = (
    "image/png",
    "image/jpeg",
    "image/tiff",
    "image/webp",
    "image/bmp",
    "image/gif",
    "application/dicom",
    "application/octet-stream",
    # A volume: a NIfTI file, gzipped (.nii.gz) or not.
    "application/gzip",
    "application/x-nifti",
)
FORM_TYPE = "multipart/form-data"
IMAGE_PARTS = ("image", "images")
FIELD_LIMIT_BYTES = 256 * 1024
# Parts beyond the images a form may hold: its options, and room for a client's extras to
# be named in a 422 rather than cut off by the 413.
_MORE_PARTS = 8
# Werkzeug reads the form in pieces of this size; a text field's limit must exceed it.
_PIECE_BYTES = 64 * 1024


def is_image_door(mimetype: str) -> bool:
    return mimetype in RAW_TYPES or mimetype == FORM_TYPE


def image_request(
    mimetype: str,
    data: bytes,
    boundary: str,
    query: Mapping[str, Sequence[str]],
    context: RequestContext,
    max_images: int,
) -> ExplainRequest:
    """The request a raw image body or a form makes, with its query's options."""
    if mimetype != FORM_TYPE:
        return flat_request([data], query)
    images, options = _form(data, boundary, context, max_images)
    return flat_request(images, query, options)


def _form(
    data: bytes, boundary: str, context: RequestContext, max_images: int
) -> tuple[list[bytes], dict[str, Any] | None]:
    """A form's image files, in the order sent, and its ``options`` object (if any)."""
    context.reserve_parsing(len(data))  # the parts are one more copy of the body
    texts, files = _parts(data, boundary, max_images + len(IMAGE_PARTS) + _MORE_PARTS)
    images: list[bytes] = []
    options: bytes | None = None
    parts: list[tuple[str, str | FileStorage]] = [*texts, *files]
    for name, value in parts:
        if name == OPTIONS_FIELD:
            if options is not None:
                raise InvalidField(
                    f"The form has more than one '{OPTIONS_FIELD}' field; send one.",
                    field=OPTIONS_FIELD,
                )
            options = value.encode() if isinstance(value, str) else _content(value)
        elif name in IMAGE_PARTS and isinstance(value, FileStorage):
            images.append(_content(value))
        elif name in IMAGE_PARTS:
            raise InvalidField(
                f"Form field '{name}' is text, not a file: send the image as a file part "
                f"(with a filename, as curl -F '{name}=@photo.png' does).",
                field=name,
            )
        else:
            _unknown_part(name)
    if not images:
        raise InvalidField(
            "The form has no image: send each as a file part named 'image' or 'images'.",
            field="images",
        )
    return images, None if options is None else _options(options, context, len(data))


def _parts(
    data: bytes, boundary: str, most: int
) -> tuple[list[tuple[str, str]], list[tuple[str, FileStorage]]]:
    """A form's text fields and its files, each in the order sent."""
    if not boundary:
        raise BadRequest(
            "The multipart/form-data Content-Type has no boundary parameter.",
            code=ErrorCode.BAD_REQUEST,
        )
    parser = MultiPartParser(
        stream_factory=_in_memory,
        max_form_memory_size=FIELD_LIMIT_BYTES,
        # Lists, not MultiDicts: a MultiDict groups parts by name, and images named
        # 'image' and 'images' keep the order they were sent in.
        cls=cast(Any, list),
        buffer_size=_PIECE_BYTES,
        max_form_parts=most,
    )
    try:
        texts, files = parser.parse(io.BytesIO(data), boundary.encode("ascii"), len(data))
    except RequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The form has more than {most} parts, or a text field of more than "
            f"{FIELD_LIMIT_BYTES} bytes; send at most {most - _MORE_PARTS - 2} images "
            f"and the '{OPTIONS_FIELD}' field.",
            code=ErrorCode.REQUEST_TOO_LARGE,
        ) from None
    except ValueError as error:  # Werkzeug's words name the form's flaw, not its data
        raise BadRequest(
            f"The multipart/form-data body is not well formed: {error}.",
            code=ErrorCode.BAD_REQUEST,
        ) from None
    return cast(list[tuple[str, str]], texts), cast(list[tuple[str, FileStorage]], files)


def _in_memory(
    total_content_length: int | None,
    content_type: str | None,
    filename: str | None,
    content_length: int | None = None,
) -> IO[bytes]:
    return io.BytesIO()


def _content(part: FileStorage) -> bytes:
    stream = part.stream
    return stream.getvalue() if isinstance(stream, io.BytesIO) else stream.read()


def _unknown_part(name: str | None) -> None:
    known = (*IMAGE_PARTS, OPTIONS_FIELD)
    close = close_matches(name or "", known)
    raise InvalidField(
        f"The form has a part named '{name}'; its parts are 'image' or 'images' (files) "
        f"and '{OPTIONS_FIELD}' (a JSON object).{did_you_mean(close)}",
        field=name or "form",
        suggestions=close,
    )


def _options(text: bytes, context: RequestContext, body_bytes: int) -> dict[str, Any]:
    """The ``options`` field as a JSON object, bounded as a JSON body is (``json_body``)."""
    try:
        return json_object(text, lambda parsed: context.reserve_parsing(body_bytes + parsed))
    except ServiceError as error:
        error.field = error.field or OPTIONS_FIELD
        error.message = f"Form field '{OPTIONS_FIELD}': {error.message}"
        raise
