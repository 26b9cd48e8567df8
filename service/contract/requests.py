"""The ``POST /v1/explain`` request: its pydantic models (the one parser, and how its
problems are told, are in ``request_parsing.py``).

``openapi.yaml``'s request schemas are generated from these models
(``python -m service.contract.openapi``), so the field descriptions below are what
API users read.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBytes,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from service.contract.terms import (
    DICOM_FORMATS,
    NO_PICTURE_FORMATS,
    HeatmapEncoding,
    HeatmapFormat,
    HeatmapSize,
    Include,
    Method,
    ReportFormat,
)

# A class given by index or by label.
ClassRef = StrictInt | Annotated[StrictStr, Field(min_length=1)]
# Per image: null (top-1 class), one class, or a list of classes (one explanation each).
# Lists stop at their first bad item (fail_fast): a long list of wrong items costs one
# error, not one each (json_body.py).
TargetSpec = ClassRef | Annotated[list[ClassRef], Field(min_length=1, fail_fast=True)] | None
_Frame = Annotated[StrictInt, Field(ge=0)]
# An image file's bytes as they came: the raw-image and form doors (``flat_options.py``)
# hand them over without a base64 round trip (two more copies of every image). JSON never
# gives bytes, so the JSON contract, and openapi.yaml, knows only base64 text.
_FileBytes = SkipJsonSchema[StrictBytes]


def target_ref(text: str) -> int | str:
    """A class given as text (a command line, a query string): its index, or its label."""
    return int(text) if text.lstrip("-").isdigit() else text


class HeatmapOptions(BaseModel):
    """What each heatmap of the answer is: its format, size and picture encoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: HeatmapFormat = Field(
        default="png",
        description=(
            "array, png, overlay, gray, none; nifti for volumes (a float32 .nii.gz with "
            "the map grid's affine; a volume's png, overlay and gray are three orthogonal "
            "slices through the map's peak); or, for DICOM sources, dicom-sc (a Secondary "
            "Capture of the overlay), dicom-pm (a float Parametric Map, for images with a "
            "Frame of Reference) or dicom-seg (one Segmentation per image of where each "
            "explained class's normalised map is at least 0.5, one segment per class, in "
            "the result's `segmentation`), all at size original, in a new series of the "
            "source's study. Where a DICOM format cannot be made for an image, its heatmap "
            "carries a reason instead of data."
        ),
    )
    size: HeatmapSize = Field(
        default="original",
        description=(
            "original: the image's own pixel grid; input: the model input's; layer: the "
            "explained layer's (no upsampling)."
        ),
    )
    # A JPEG gray map dithers levels: use PNG to read values.
    encoding: HeatmapEncoding = Field(
        default="png",
        description=(
            "How png, overlay and gray pictures are encoded: lossless PNG, or the smaller, "
            "lossy JPEG (quality 90) or WebP (quality 85); for dicom-sc, png means "
            "uncompressed and jpeg JPEG Baseline (no webp). Only with those formats; with "
            "array, none, dicom-pm or dicom-seg it is a 422."
        ),
    )

    @model_validator(mode="after")
    def _encoding_needs_a_picture(self) -> HeatmapOptions:
        if "encoding" in self.model_fields_set and self.format in NO_PICTURE_FORMATS:
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

    url: Annotated[StrictStr, Field(min_length=1, max_length=2048)] = Field(
        description="The DICOMweb root."
    )
    study: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    series: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    instance: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = Field(
        default=None,
        description=("The instance; left out: the whole series, one volume (for a volume model)."),
    )


class DicomWebImage(BaseModel):
    """An image named by its UIDs instead of sent: ``{"dicomweb": {...}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dicomweb: DicomWebInstance


class DicomSeriesImage(BaseModel):
    """A volume sent as the instances of its DICOM series: ``{"series": [...]}``, each
    a base64 Part 10 file, in any order (they are sorted by position)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    series: Annotated[
        list[Annotated[StrictStr, Field(min_length=1)]],
        Field(min_length=2, max_length=4096, fail_fast=True),
    ]


class StoreOptions(BaseModel):
    """Where the answer's DICOM objects (``dicom-sc``/``dicom-pm``/``dicom-seg``, and the
    ``dicom-sr`` report) are stored (STOW-RS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[StrictStr, Field(min_length=1, max_length=2048)]


class ExplainRequest(BaseModel):
    """Body of ``POST /v1/explain``."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        default=None, description="A model of the models file; default the file's default model."
    )
    images: Annotated[
        list[StrictStr | DicomWebImage | DicomSeriesImage | _FileBytes],
        Field(min_length=1, fail_fast=True),
    ] = Field(
        description=(
            "Base64 (or a data: URL) of PNG (8/16-bit), JPEG, TIFF, BMP, WebP, GIF or DICOM "
            "images (other formats are a 415), or an instance on a DICOMweb server named by "
            "its UIDs (fetched with WADO-RS; only servers in GRADCAM_DICOMWEB_SERVERS, else "
            "403 dicomweb_not_allowed). For a volume model: a NIfTI file (.nii, .nii.gz) or "
            "an enhanced multi-frame DICOM in base64, a series as its instances "
            '({"series": [base64, ...]}), or a whole series on a DICOMweb server (dicomweb '
            "without instance). At most GRADCAM_MAX_IMAGES_PER_REQUEST (default 32; "
            "more is a 413); see the limits above for pixels."
        )
    )
    targets: Annotated[list[TargetSpec], Field(fail_fast=True)] | None = Field(
        default=None,
        description=(
            "One entry per image: null (the top-1 class), a class by index or label, or a "
            "list of classes (one explanation each); repeated classes are explained once. "
            "At most GRADCAM_MAX_EXPLANATIONS_PER_REQUEST (default 128) over all images."
        ),
    )
    method: Method = "gradcam"
    layer: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        default=None,
        description="A layer name as GET /v1/models/{name}/layers lists; default the model's.",
    )
    top_k: Annotated[StrictInt, Field(ge=1)] = 5
    heatmap: HeatmapOptions = HeatmapOptions()
    frame: _Frame | Annotated[list[_Frame | None], Field(min_length=1, fail_fast=True)] | None = (
        Field(
            default=None,
            description=(
                "Which frame of a multi-frame image to explain: one number for every image, or "
                "a list with one entry per image (null: that image's default; another length is "
                "a 422 frames_length). Required for multi-frame DICOM; TIFF, GIF and WebP "
                "default to the first; past the last frame is a 422 frame_out_of_range."
            ),
        )
    )
    include: Annotated[list[Include], Field(max_length=3, fail_fast=True)] = Field(
        default=[],
        description=(
            'Extras for each result: "image", the picture heatmaps are drawn over (original '
            "size, 8-bit, after EXIF orientation and DICOM rescale, window and MONOCHROME1; "
            "for clients that cannot decode the upload; counts towards the pixels drawn); "
            '"dicom", a DICOM file\'s patient, study and display attributes (null for other '
            'formats); "faithfulness", each explanation\'s deletion and insertion curves and '
            "their areas (39 more forward passes per explanation; at most "
            "GRADCAM_MAX_FAITHFULNESS_PER_REQUEST, default 32, explanations)."
        ),
    )
    report: ReportFormat | None = Field(
        default=None,
        description=(
            "dicom-sr: for each DICOM image, a DICOM SR Measurement Report (TID 1500, "
            "Comprehensive 3D SR) in the result's `report`: per explained class its "
            "probability, the method, layer and model, and the heatmap's peak as a point on "
            "the source image; it references the source and the dicom-sc / dicom-pm / "
            "dicom-seg objects of the same answer. With any heatmap format; an image that "
            "is not DICOM gets a reason instead."
        ),
    )
    store: StoreOptions | None = Field(
        default=None,
        description=(
            "Store the answer's DICOM objects (dicom-sc, dicom-pm, dicom-seg, the dicom-sr "
            "report) on a DICOMweb server (STOW-RS, one of GRADCAM_DICOMWEB_SERVERS); each "
            "heatmap, segmentation or report then says how it went in `stored`. Only with a "
            "DICOM format or a report (else 422)."
        ),
    )

    @model_validator(mode="after")
    def _store_needs_dicom(self) -> ExplainRequest:
        if (
            self.store is not None
            and self.heatmap.format not in DICOM_FORMATS
            and self.report is None
        ):
            raise ValueError(
                "store sends DICOM objects: heatmap.format must be 'dicom-sc', 'dicom-pm' or "
                "'dicom-seg', or report 'dicom-sr'"
            )
        return self
