"""Errors the service reports, each with an HTTP status and a stable machine code.

::

    ServiceError                    500 internal (never raised for client input)
    ├── BadRequest                  400 bad_request, invalid_json, json_too_deep
    ├── Forbidden                   403 forbidden, dicomweb_not_allowed
    ├── NotFound                    404 not_found
    │   └── UnknownModel            404 unknown_model
    ├── MethodNotAllowed            405 method_not_allowed
    ├── PayloadTooLarge             413 request_too_large, image_too_large, too_many_images,
    │                                   too_many_targets, too_many_pixels, output_too_large,
    │                                   array_too_large, over_memory_budget, json_too_complex
    ├── UnsupportedMediaType        415 unsupported_media_type, unsupported_image,
    │                                   unsupported_content_encoding
    ├── InvalidField                422 invalid_field, unknown_layer, unknown_method,
    │                                   unknown_label, target_out_of_range, invalid_image,
    │                                   invalid_volume, volume_required, image_required, ...
    ├── ClientClosed                499 client_closed (nobody reads it; for logs and metrics)
    ├── BadGateway                  502 dicomweb_unreachable, dicomweb_failed (the other
    │                                   server failed, not the client)
    ├── Unavailable                 503, with Retry-After
    │   ├── Overloaded              503 overloaded (the engine's queue, or the memory
    │   │                               budget, is full)
    │   ├── EngineUnavailable       503 engine_unavailable (no engine answers)
    │   └── InsufficientMemory      503 insufficient_memory (a MemoryError: the server's fault)
    └── DeadlineExceeded            504 deadline_exceeded

    ConfigError                     start-up only: a broken models file or setting

Messages are whole sentences meant for the person who sent the request; ``image``
is the index of the image at fault when one image is. Errors cross from the
engine process to the HTTP workers as ``to_wire()`` dicts and come back to life
with ``from_wire()``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema


class ErrorCode(StrEnum):
    """Every machine code an error response may carry: its HTTP status and what it means.

    The one list: ``openapi.yaml`` and docs/api.md's error table are checked against it
    (``tests/unit/contract/test_errors.py``), and the service names codes only through it.
    """

    status: int
    meaning: str

    def __new__(cls, value: str, status: int, meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.meaning = meaning
        return member

    BAD_REQUEST = "bad_request", 400, "malformed HTTP"
    INVALID_JSON = "invalid_json", 400, "the body is not valid JSON"
    JSON_TOO_DEEP = "json_too_deep", 400, "JSON nested over 1024 levels"
    UNAUTHORIZED = "unauthorized", 401, "no valid bearer token"
    FORBIDDEN = "forbidden", 403, "not allowed"
    DICOMWEB_NOT_ALLOWED = "dicomweb_not_allowed", 403, "a DICOMweb URL not in the allow-list"
    NOT_FOUND = "not_found", 404, "no such route"
    UNKNOWN_MODEL = "unknown_model", 404, "no such model"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "the route does not take this method"
    REQUEST_TIMEOUT = "request_timeout", 408, "headers or body too slow"
    REQUEST_TOO_LARGE = "request_too_large", 413, "the body is over the limit"
    TOO_MANY_IMAGES = "too_many_images", 413, "more images than a request may hold"
    TOO_MANY_TARGETS = "too_many_targets", 413, "more explanations than a request may ask"
    IMAGE_TOO_LARGE = "image_too_large", 413, "an image over the pixel or side limit"
    TOO_MANY_PIXELS = "too_many_pixels", 413, "the request's images hold too many pixels"
    OUTPUT_TOO_LARGE = "output_too_large", 413, "the answer would be too large"
    ARRAY_TOO_LARGE = "array_too_large", 413, "a heatmap array over the value limit"
    OVER_MEMORY_BUDGET = "over_memory_budget", 413, "more memory than the budget leaves"
    JSON_TOO_COMPLEX = (
        "json_too_complex",
        413,
        "JSON of over 100000 values, or an object of over 256 keys",
    )
    URI_TOO_LONG = "uri_too_long", 414, "the request target is too long"
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type",
        415,
        "the body is not JSON, an image file or a form",
    )
    UNSUPPORTED_CONTENT_ENCODING = ("unsupported_content_encoding", 415, "a compressed body")
    UNSUPPORTED_IMAGE = "unsupported_image", 415, "an image format the service does not read"
    INVALID_BODY = "invalid_body", 422, "the body is not a JSON object"
    INVALID_FIELD = "invalid_field", 422, "a field with a wrong value (see field)"
    OUT_OF_DOMAIN = (
        "out_of_domain",
        422,
        "a DICOM image the model is not for (its modality or body part)",
    )
    INVALID_BASE64 = "invalid_base64", 422, "an image that is not valid base64"
    EMPTY_IMAGE = "empty_image", 422, "an empty image"
    INVALID_IMAGE = "invalid_image", 422, "an image that cannot be decoded"
    FRAME_REQUIRED = "frame_required", 422, "a multi-frame image without a frame"
    FRAME_OUT_OF_RANGE = "frame_out_of_range", 422, "a frame the image does not have"
    FRAMES_LENGTH = "frames_length", 422, "one frame per image needed"
    INVALID_VOLUME = (
        "invalid_volume",
        422,
        "a volume that cannot be read: a broken header, missing or duplicate slices, "
        "uneven spacing, mixed orientations or sizes",
    )
    VOLUME_REQUIRED = "volume_required", 422, "a 2-D image sent to a volume model"
    IMAGE_REQUIRED = "image_required", 422, "a volume sent to a 2-D model"
    DICOMWEB_NOT_FOUND = "dicomweb_not_found", 422, "no such instance on the DICOMweb server"
    UNKNOWN_LAYER = "unknown_layer", 422, "no such layer"
    UNSUPPORTED_LAYER = "unsupported_layer", 422, "a layer whose output cannot be explained"
    UNKNOWN_LABEL = "unknown_label", 422, "no such class label"
    TARGET_OUT_OF_RANGE = "target_out_of_range", 422, "a class index outside the outputs"
    TARGETS_LENGTH = "targets_length", 422, "one target list per image needed"
    HEADERS_TOO_LARGE = "headers_too_large", 431, "request line and headers over 32 KiB"
    CLIENT_CLOSED = "client_closed", 499, "the client left first (logs and metrics only)"
    INTERNAL = "internal", 500, "the server failed (logged with the request id)"
    UNSUPPORTED_TRANSFER_ENCODING = (
        "unsupported_transfer_encoding",
        501,
        "a transfer coding other than chunked",
    )
    BAD_GATEWAY = "bad_gateway", 502, "a server this one called failed"
    DICOMWEB_UNREACHABLE = "dicomweb_unreachable", 502, "the DICOMweb server cannot be reached"
    DICOMWEB_FAILED = "dicomweb_failed", 502, "the DICOMweb server failed"
    UNAVAILABLE = "unavailable", 503, "try again later"
    OVERLOADED = "overloaded", 503, "the queue or the memory budget is full"
    ENGINE_UNAVAILABLE = "engine_unavailable", 503, "no engine process answers"
    INSUFFICIENT_MEMORY = "insufficient_memory", 503, "the server ran out of memory"
    DEADLINE_EXCEEDED = "deadline_exceeded", 504, "still queued at the request's deadline"
    HTTP_VERSION_NOT_SUPPORTED = ("http_version_not_supported", 505, "not HTTP/1.0 or 1.1")


class ServiceError(Exception):
    """Base of every error that becomes a JSON error response. A class names its default
    code; its HTTP status is that code's."""

    default_code: ErrorCode = ErrorCode.INTERNAL
    status: int = ErrorCode.INTERNAL.status

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = cls.default_code.status

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        image: int | None = None,
        field: str | None = None,
        suggestions: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.image = image
        self.field = field
        # Close matches to a name that does not exist (contract/suggestions.py).
        self.suggestions = suggestions or None

    def to_response(self) -> ErrorResponse:
        """The JSON error envelope: ``{"error": {"code", "message", "image"?, "field"?}}``."""
        body = ErrorBody(code=self.code, message=self.message)
        if self.image is not None:
            body.image = self.image
        if self.field is not None:
            body.field = self.field
        if self.suggestions:
            body.suggestions = list(self.suggestions)
        return ErrorResponse(error=body)

    def to_wire(self) -> dict[str, Any]:
        """Everything needed to raise the same error in another process."""
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "image": self.image,
            "field": self.field,
            "suggestions": self.suggestions,
            "retry_after_s": getattr(self, "retry_after_s", None),
        }

    @staticmethod
    def from_wire(data: dict[str, Any]) -> ServiceError:
        status = int(data.get("status", 500))
        # A code that is not one of ours means the other side is broken.
        code = _CODES.get(str(data.get("code")), ErrorCode.INTERNAL)
        kind = _by_code().get(code, _BY_STATUS.get(status, ServiceError))
        if issubclass(kind, Unavailable):
            error: ServiceError = kind(
                str(data["message"]), retry_after_s=int(data.get("retry_after_s") or 1)
            )
            error.code = code
            return error
        return kind(
            str(data["message"]),
            code=code,
            image=data.get("image"),
            field=data.get("field"),
            suggestions=data.get("suggestions"),
        )


class BadRequest(ServiceError):
    default_code = ErrorCode.BAD_REQUEST


class Forbidden(ServiceError):
    default_code = ErrorCode.FORBIDDEN


class NotFound(ServiceError):
    default_code = ErrorCode.NOT_FOUND


class UnknownModel(NotFound):
    default_code = ErrorCode.UNKNOWN_MODEL


class MethodNotAllowed(ServiceError):
    default_code = ErrorCode.METHOD_NOT_ALLOWED


class PayloadTooLarge(ServiceError):
    default_code = ErrorCode.REQUEST_TOO_LARGE


class UnsupportedMediaType(ServiceError):
    default_code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class InvalidField(ServiceError):
    default_code = ErrorCode.INVALID_FIELD


class ClientClosed(ServiceError):
    """The client went away before its explanation was computed (nginx's 499)."""

    default_code = ErrorCode.CLIENT_CLOSED


class BadGateway(ServiceError):
    """A server this one had to call (a DICOMweb server) failed or could not be reached."""

    default_code = ErrorCode.BAD_GATEWAY


class Unavailable(ServiceError):
    """503: try again after ``retry_after_s`` (sent as ``Retry-After``)."""

    default_code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    default_code = ErrorCode.OVERLOADED


class EngineUnavailable(Unavailable):
    """No engine process answers (starting, restarting after a crash, or gone)."""

    default_code = ErrorCode.ENGINE_UNAVAILABLE


class InsufficientMemory(Unavailable):
    """The process ran out of memory on this request: a server fault, never the client's 422."""

    default_code = ErrorCode.INSUFFICIENT_MEMORY


class DeadlineExceeded(ServiceError):
    default_code = ErrorCode.DEADLINE_EXCEEDED


_CODES: dict[str, ErrorCode] = {code.value: code for code in ErrorCode}


def _by_code() -> dict[str, type[ServiceError]]:
    """Every error class of this module by its default code (the most specific class for
    a code). Subclasses elsewhere (``security.Unauthorized``) never cross the wire and
    may take other arguments."""
    found: dict[str, type[ServiceError]] = {}
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        kind = pending.pop()
        if kind.__module__ == __name__:
            found[kind.default_code] = kind
        pending.extend(kind.__subclasses__())
    return found


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidField,
    499: ClientClosed,
    502: BadGateway,
    503: Unavailable,
    504: DeadlineExceeded,
}


class ConfigError(Exception):
    """A models file or setting that cannot work; raised at start-up, never per request."""


class ErrorBody(BaseModel):
    """What went wrong; ``image`` and ``field`` only where they apply (absent otherwise)."""

    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str = Field(description="A sentence for a person.")
    image: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None, description="The index of the image at fault, where one is."
    )
    field: str | SkipJsonSchema[None] = Field(
        default=None, description="The request field at fault, as a JSON path (targets[0])."
    )
    suggestions: list[str] | SkipJsonSchema[None] = Field(
        default=None,
        description=(
            "Where the request named something that does not exist (a model, layer, class "
            "label, method, format ...): the close matches, closest first."
        ),
    )


class ErrorResponse(BaseModel):
    """Every error answer, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorBody
