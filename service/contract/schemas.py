"""pydantic models of the HTTP boundary: the ``/v1/explain`` request and response.

The CLI's ``explain --request`` reads the same request model and prints the same
response, so both stay one contract (see ``openapi.yaml``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from service.contract.errors import BadRequest, ErrorCode, InvalidField
from service.contract.terms import (
    DICOM_FORMATS,
    HeatmapEncoding,
    HeatmapFormat,
    HeatmapSize,
    Include,
    Method,
    ResizeMode,
)

# A class given by index or by label.
ClassRef = StrictInt | Annotated[StrictStr, Field(min_length=1)]
# Per image: null (top-1 class), one class, or a list of classes (one explanation each).
TargetSpec = ClassRef | Annotated[list[ClassRef], Field(min_length=1)] | None


class HeatmapOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: HeatmapFormat = "png"
    size: HeatmapSize = "original"
    # How png, overlay and gray pictures are encoded: lossless PNG, or the smaller,
    # lossy JPEG / WebP (a JPEG gray map dithers levels: use PNG to read values).
    encoding: HeatmapEncoding = "png"

    @model_validator(mode="after")
    def _encoding_needs_a_picture(self) -> HeatmapOptions:
        if "encoding" in self.model_fields_set and self.format in ("array", "none", "dicom-pm"):
            raise ValueError(
                f"encoding applies to the png, overlay, gray and dicom-sc formats, "
                f"not to '{self.format}'"
            )
        if self.format == "dicom-sc" and self.encoding == "webp":
            raise ValueError(
                "a dicom-sc object is uncompressed (encoding png) or JPEG (jpeg); DICOM has no WebP"
            )
        if self.format in DICOM_FORMATS and self.size != "original":
            raise ValueError(
                f"a {self.format} object lies on the source image's own pixel grid: "
                "size must be 'original'"
            )
        return self


class DicomWebInstance(BaseModel):
    """An instance on a DICOMweb server (one of ``GRADCAM_DICOMWEB_SERVERS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    study: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    series: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    instance: Annotated[StrictStr, Field(min_length=1, max_length=64)]


class DicomWebImage(BaseModel):
    """An image named by its UIDs instead of sent: ``{"dicomweb": {...}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dicomweb: DicomWebInstance


class StoreOptions(BaseModel):
    """Where the ``dicom-sc``/``dicom-pm`` objects are stored (STOW-RS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[StrictStr, Field(min_length=1, max_length=2048)]


class ExplainRequest(BaseModel):
    """Body of ``POST /v1/explain``."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: Annotated[StrictStr, Field(min_length=1)] | None = None
    images: Annotated[list[StrictStr | DicomWebImage], Field(min_length=1)]
    targets: list[TargetSpec] | None = None
    method: Method = "gradcam"
    layer: Annotated[StrictStr, Field(min_length=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=1)] = 5
    heatmap: HeatmapOptions = HeatmapOptions()
    # Which frame of multi-frame images: one for all, or one per image (null: the default).
    frame: (
        Annotated[StrictInt, Field(ge=0)]
        | Annotated[list[Annotated[StrictInt, Field(ge=0)] | None], Field(min_length=1)]
        | None
    ) = None
    include: Annotated[list[Include], Field(max_length=2)] = []
    store: StoreOptions | None = None

    @model_validator(mode="after")
    def _store_needs_dicom(self) -> ExplainRequest:
        if self.store is not None and self.heatmap.format not in DICOM_FORMATS:
            raise ValueError(
                "store sends DICOM objects: heatmap.format must be 'dicom-sc' or 'dicom-pm'"
            )
        return self


class Prediction(BaseModel):
    index: int
    label: str
    score: float


class Heatmap(BaseModel):
    """A heatmap: ``values`` (format ``array``) or ``data`` (a base64 picture in ``encoding``,
    or a DICOM Part 10 file for ``dicom-sc``/``dicom-pm``), or neither (``none``, or a
    ``reason`` why that format cannot be made for this image).

    ``raw_max`` is the map's maximum before min-max normalisation (in units of the
    score's gradient times the activation): 0 means the map was all zero.
    """

    format: HeatmapFormat
    width: int
    height: int
    raw_max: float
    values: list[list[float]] | None = None
    data: str | None = None
    encoding: HeatmapEncoding | None = None
    reason: str | None = None
    # dicom-sc/dicom-pm: the object's UIDs, and what storing it did (``store``).
    uids: dict[str, str] | None = None
    stored: dict[str, Any] | None = None


class Explanation(BaseModel):
    target: Prediction
    heatmap: Heatmap


class Geometry(BaseModel):
    """How the image was fitted to the model input.

    ``box`` is the part of the original image (``x0, y0, x1, y1`` in its pixels,
    possibly beyond its edges for ``letterbox``) that the model input covers.
    """

    resize: ResizeMode
    input_width: int
    input_height: int
    box: tuple[float, float, float, float]


class Picture(BaseModel):
    """The image as overlays are drawn on it (``include: ["image"]``): its original
    pixel grid, 8-bit, after EXIF orientation, DICOM rescale, window and
    MONOCHROME1 inversion; encoded like the heatmaps (``heatmap.encoding``)."""

    width: int
    height: int
    encoding: HeatmapEncoding
    data: str


class ImageResult(BaseModel):
    width: int
    height: int
    geometry: Geometry
    predictions: list[Prediction]
    explanations: list[Explanation]
    image: Picture | None = None
    # ``include: ["dicom"]``: the DICOM attributes read (null for other formats).
    dicom: dict[str, Any] | None = None


class ExplainResponse(BaseModel):
    """Body of a 200 answer to ``POST /v1/explain``."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    method: Method
    layer: str
    precision: Literal["fp32", "bf16"]
    results: list[ImageResult]


class ErrorBody(BaseModel):
    code: str
    message: str
    image: int | None = None
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# orjson refuses deeper nesting itself (a request needs 3 levels): no parse can recurse away.
JSON_MAX_DEPTH = 1024


def parse_explain_request(body: bytes) -> ExplainRequest:
    """Parse and validate a request body; errors become 400 (not JSON) or 422 (invalid field)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if "depth limit" in str(error):
            raise BadRequest(
                f"The body nests JSON deeper than {JSON_MAX_DEPTH} levels.",
                code=ErrorCode.JSON_TOO_DEEP,
            ) from None
        raise BadRequest(
            f"The body is not valid JSON: {error}.", code=ErrorCode.INVALID_JSON
        ) from None
    if not isinstance(data, dict):
        raise InvalidField("The body must be a JSON object.", code=ErrorCode.INVALID_BODY)
    try:
        return ExplainRequest.model_validate(data)
    except ValidationError as error:
        raise invalid_field(error) from None


def invalid_field(error: ValidationError) -> InvalidField:
    """The first problem pydantic found, as a 422 that names the field."""
    first = error.errors()[0]
    loc = first["loc"]
    known = (
        set(ExplainRequest.model_fields)
        | set(HeatmapOptions.model_fields)
        | set(DicomWebImage.model_fields)
        | set(DicomWebInstance.model_fields)
    )
    path = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in known or (first["type"] == "extra_forbidden" and position == len(loc) - 1):
            path += f".{part}"
        else:
            break  # a union member's type name, not part of the JSON path
    field = path.lstrip(".") or "body"
    image = (
        loc[1]
        if len(loc) > 1 and loc[0] in ("images", "targets") and isinstance(loc[1], int)
        else None
    )
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = f" (and {len(error.errors()) - 1} more problem(s))" if len(error.errors()) > 1 else ""
    return InvalidField(f"Field '{field}': {message}{more}.", field=field, image=image)
