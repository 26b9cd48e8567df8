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
    │                                   array_too_large, over_memory_budget
    ├── UnsupportedMediaType        415 unsupported_media_type, unsupported_image,
    │                                   unsupported_content_encoding
    ├── InvalidField                422 invalid_field, unknown_layer, unknown_method,
    │                                   unknown_label, target_out_of_range, invalid_image, ...
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

from typing import Any


class ServiceError(Exception):
    """Base of every error that becomes a JSON error response."""

    status: int = 500
    default_code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, image: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.image = image
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """The JSON error envelope: ``{"error": {"code", "message", "image"?, "field"?}}``."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.image is not None:
            body["image"] = self.image
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}

    def to_wire(self) -> dict[str, Any]:
        """Everything needed to raise the same error in another process."""
        return {"status": self.status, "code": self.code, "message": self.message,
                "image": self.image, "field": self.field,
                "retry_after_s": getattr(self, "retry_after_s", None)}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> ServiceError:
        status = int(data.get("status", 500))
        kind = _by_code().get(str(data.get("code")), _BY_STATUS.get(status, ServiceError))
        if issubclass(kind, Unavailable):
            error: ServiceError = kind(str(data["message"]),
                                       retry_after_s=int(data.get("retry_after_s") or 1))
            error.code = str(data["code"])
            return error
        return kind(str(data["message"]), code=str(data["code"]), image=data.get("image"),
                    field=data.get("field"))


class BadRequest(ServiceError):
    status = 400
    default_code = "bad_request"


class Forbidden(ServiceError):
    status = 403
    default_code = "forbidden"


class NotFound(ServiceError):
    status = 404
    default_code = "not_found"


class UnknownModel(NotFound):
    default_code = "unknown_model"


class MethodNotAllowed(ServiceError):
    status = 405
    default_code = "method_not_allowed"


class PayloadTooLarge(ServiceError):
    status = 413
    default_code = "request_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    default_code = "unsupported_media_type"


class InvalidField(ServiceError):
    status = 422
    default_code = "invalid_field"


class ClientClosed(ServiceError):
    """The client went away before its explanation was computed (nginx's 499)."""

    status = 499
    default_code = "client_closed"


class BadGateway(ServiceError):
    """A server this one had to call (a DICOMweb server) failed or could not be reached."""

    status = 502
    default_code = "bad_gateway"


class Unavailable(ServiceError):
    """503: try again after ``retry_after_s`` (sent as ``Retry-After``)."""

    status = 503
    default_code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    default_code = "overloaded"


class EngineUnavailable(Unavailable):
    """No engine process answers (starting, restarting after a crash, or gone)."""

    default_code = "engine_unavailable"


class InsufficientMemory(Unavailable):
    """The process ran out of memory on this request: a server fault, never the client's 422."""

    default_code = "insufficient_memory"


class DeadlineExceeded(ServiceError):
    status = 504
    default_code = "deadline_exceeded"


def _by_code() -> dict[str, type[ServiceError]]:
    """Every error class by its default code (the most specific class for a code)."""
    found: dict[str, type[ServiceError]] = {}
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        kind = pending.pop()
        found[kind.default_code] = kind
        pending.extend(kind.__subclasses__())
    return found


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
    413: PayloadTooLarge, 415: UnsupportedMediaType, 422: InvalidField, 499: ClientClosed,
    502: BadGateway, 503: Unavailable, 504: DeadlineExceeded,
}


class ConfigError(Exception):
    """A models file or setting that cannot work; raised at start-up, never per request."""
